"""Tiny models for tests: a real byte-level BPE tokenizer and a random Llama.

Nothing is downloaded. The tokenizer is trained in well under a second on the
built-in corpus below, so the same code gives the same vocabulary everywhere.
The corpus is deliberately self-contained (the demo data set is not read) so a
change to the demo data never changes the tiny tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_ray.models.provision import staging_folder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TINY_VOCAB_SIZE = 1024

# ChatML: every message is "<|im_start|>{role}\n{content}<|im_end|>\n"; the
# generation prompt opens an assistant turn. Kept on one line so Jinja's
# trim_blocks/lstrip_blocks settings cannot change the whitespace.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
Good morning! The sun came up over the hills and the birds started to sing. \
I made a cup of coffee, opened the window, and listened to the quiet street. \
My neighbour was already walking her dog, and the baker down the road was \
putting fresh bread in the window.

After breakfast we went to the market. We bought apples, carrots, potatoes, \
onions, cheese, eggs and a big loaf of brown bread. The man at the fruit stall \
told us that the strawberries were sweet this week because of the warm weather. \
We paid with cash, said thank you, and carried everything home in two bags.

A simple tip for houseplants: water them when the top of the soil feels dry, \
not on a fixed day. Most plants like bright light but not hot direct sun. \
Turn the pot a little every week so the plant grows evenly.

Sleep matters more than most people think. A regular bedtime, a dark room and \
no screens in the last hour before bed can help you fall asleep faster. Short \
walks during the day and less coffee in the afternoon help too.

The train to the city leaves at eight fifteen from platform two. If you miss it, \
the next one comes half an hour later. Tickets are cheaper before nine o'clock, \
and children under five travel for free.

Question: What is the capital of France? Answer: The capital of France is Paris. \
Question: How many days are in a week? Answer: There are seven days in a week. \
Question: What colour is the sky on a clear day? Answer: The sky is blue.

Thank you for asking! Here is a short and friendly answer. I hope this helps, \
and feel free to ask me anything else. Sorry, I am not sure about that one, \
but I can tell you what I do know.

Cooking rice is easy: rinse one cup of rice, add two cups of water and a pinch \
of salt, bring it to a boil, then cover the pan and let it simmer for about \
fifteen minutes. Leave the lid on for five more minutes before you serve it.

Honeybees visit thousands of flowers every day. They carry pollen from one \
flower to the next, which helps fruit and vegetables grow. A healthy hive can \
hold tens of thousands of bees in the middle of summer.

To save money, write down what you spend for one month. Many people are \
surprised by how much small things add up. Make a plan, keep a little for \
emergencies, and check your budget again at the end of each month.

The system asked the user a question, and the assistant gave a helpful, \
honest and harmless answer. A good assistant explains things clearly, admits \
when it does not know, and keeps the reply short when a short reply is enough.

On rainy weekends the family stays inside. The children build a castle out of \
blankets and chairs, their grandmother tells stories about her village, and \
everyone plays cards after dinner. When the weather clears they put on boots \
and jump in the puddles in the park, then come back hungry for soup.

Learning to ride a bicycle takes patience. Start on a flat, quiet path, keep \
your eyes ahead instead of on the wheel, and pedal gently. Everybody falls a \
few times; the important thing is to get back on and try again tomorrow.

Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 15 20 24 30 42 50 60 99 100 365 1000 2024.
Punctuation: a, b; c: d. e! f? (g) [h] {i} "j" 'k' - l / m * n + o = p % q # r @ s & t.
"""


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (vocab 1024) with ChatML special tokens.

    `<|endoftext|>` is pad and unk, `<|im_end|>` is eos, `<|im_start|>` opens a
    turn. No BOS is added when encoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        bos_token=ENDOFTEXT,
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def make_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,  # head_dim 32: the smallest head size vLLM's CPU attention supports
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
) -> Path:
    """Write a randomly initialised LlamaForCausalLM (+ tokenizer) to `out_dir`.

    head_dim is hidden_size // num_heads (e.g. hidden_size=128, num_heads=4 gives
    32). Same seed, same weights. The folder is assembled in a hidden sibling
    and renamed into place with a `.complete` marker, so it is never seen
    half-written. `out_dir` must not exist or be an empty folder.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}) "
            f"and num_heads by num_kv_heads ({num_kv_heads})"
        )
    target = Path(out_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not an empty folder")
    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = max_position_embeddings
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        **special_ids,
    )
    with torch.random.fork_rng(devices=[]):  # seed locally, leave the caller's RNG alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(**special_ids)

    with staging_folder(target, info={"kind": "tiny-llama", "seed": seed}) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
