"""Generate the rlhf-ray demo data set (data/demo/*.jsonl).

All text below was written by the rlhf-ray authors for this project
(Apache-2.0). Nothing is downloaded and no third-party data is used.

The set is built from a small table of everyday topics, each with two facts
and one tip, plus question templates. It is deliberately easy to learn:

* chosen responses greet the user, mention the topic of the prompt, give the
  relevant fact or tip and end with a friendly closing;
* rejected responses are curt or dismissive ("Figure it out yourself."), or
  are an off-topic sentence about a different topic with no greeting.

Outputs (fixed seed, byte-for-byte reproducible):

    data/demo/sft.jsonl      {"prompt", "completion"}
    data/demo/pairs.jsonl    {"prompt", "chosen", "rejected"}
    data/demo/prompts.jsonl  {"prompt"}  (held out from pairs and sft)

Usage: python data/make_demo.py
"""

import json
import random
from pathlib import Path

SEED = 1234
N_SFT, N_PAIRS, N_PROMPTS = 300, 400, 200
OUT_DIR = Path(__file__).resolve().parent / "demo"

# (topic, fact, fact, tip) -- short, simple and written for this project.
TOPICS = [
    (
        "cooking",
        "Heat makes the proteins in eggs firm up, which is why eggs set when cooked.",
        "Onions taste sweeter when cooked slowly because their natural sugars brown.",
        "Read the whole recipe before you start so nothing surprises you halfway.",
    ),
    (
        "baking bread",
        "Yeast eats sugar and releases gas, which makes bread dough rise.",
        "Kneading builds gluten, which gives bread its chewy texture.",
        "Let the dough rise somewhere warm and covered so it does not dry out.",
    ),
    (
        "gardening",
        "Most vegetables grow best with at least six hours of sunlight a day.",
        "Earthworms help a garden by loosening the soil and adding nutrients.",
        "Water deeply and less often so roots grow down into the soil.",
    ),
    (
        "houseplants",
        "Overwatering is one of the most common ways houseplants die.",
        "Many houseplants slowly lean toward the window because they grow toward light.",
        "Water only when the top inch of soil feels dry to your finger.",
    ),
    (
        "bicycles",
        "A bicycle chain runs best when it is clean and lightly oiled.",
        "Properly inflated tires make a bicycle much easier to pedal.",
        "Check your tire pressure and brakes before every longer ride.",
    ),
    (
        "running",
        "Easy runs, where you can still talk, build endurance safely.",
        "Running shoes slowly lose their cushioning after a few hundred miles.",
        "Increase your weekly distance slowly to avoid injuries.",
    ),
    (
        "swimming",
        "Water supports your body, so swimming is gentle on the joints.",
        "Swimming works the arms, legs and core at the same time.",
        "Practice breathing out slowly underwater so each breath feels calmer.",
    ),
    (
        "sleep",
        "Most adults need about seven to nine hours of sleep a night.",
        "Sleep helps the brain store memories from the day.",
        "Go to bed and wake up at the same time each day, even on weekends.",
    ),
    (
        "budgeting",
        "A budget is simply a plan for how you will spend your money.",
        "Tracking small daily purchases often reveals surprising spending.",
        "Write down your income and fixed bills first, then plan the rest.",
    ),
    (
        "saving money",
        "Saving a little every month adds up faster than most people expect.",
        "Interest can help money in a savings account grow over time.",
        "Move a small amount to savings right after payday so you do not miss it.",
    ),
    (
        "stars",
        "The Sun is a star, and it is the closest star to Earth.",
        "Stars twinkle because the air around Earth bends their light.",
        "Let your eyes adjust to the dark for about twenty minutes before stargazing.",
    ),
    (
        "the moon",
        "The Moon has no light of its own; it reflects sunlight.",
        "The same side of the Moon always faces Earth.",
        "Use binoculars and look along the line between light and dark to see craters.",
    ),
    (
        "rain",
        "Rain falls when tiny droplets in a cloud join and become too heavy to float.",
        "The fresh earthy smell after rain has a name: petrichor.",
        "Keep a small umbrella in your bag during the rainy season.",
    ),
    (
        "snow",
        "Snowflakes usually have six sides because of how ice crystals form.",
        "Fresh snow absorbs sound, which is why snowy days feel so quiet.",
        "Dress in layers on snowy days so you stay warm and dry.",
    ),
    (
        "dogs",
        "Dogs have a far stronger sense of smell than people do.",
        "A wagging tail can mean many things, not only happiness.",
        "Short, regular training sessions with treats work well for most dogs.",
    ),
    (
        "cats",
        "Cats often sleep twelve hours or more a day.",
        "Cats use their whiskers to sense the space around them.",
        "Give your cat a scratching post so it leaves the furniture alone.",
    ),
    (
        "birds",
        "Birds are the only living animals with feathers.",
        "Many birds migrate long distances every year.",
        "A shallow dish of clean water can attract birds to your yard.",
    ),
    (
        "tea",
        "Green tea and black tea come from the same plant.",
        "People in China have been drinking tea for thousands of years.",
        "Use water just below boiling for green tea so it does not taste bitter.",
    ),
    (
        "coffee",
        "Coffee beans are the roasted seeds of a fruit called the coffee cherry.",
        "The caffeine in coffee can stay in your body for several hours.",
        "Store coffee beans in a sealed container away from light and heat.",
    ),
    (
        "recycling",
        "Recycling aluminum cans saves most of the energy needed to make new ones.",
        "Paper can be recycled several times before its fibers get too short.",
        "Rinse containers before recycling them so they do not spoil other items.",
    ),
    (
        "composting",
        "Compost turns food scraps and dry leaves into rich soil.",
        "A compost pile needs air, moisture and a mix of green and brown materials.",
        "Chop scraps into small pieces so your compost breaks down faster.",
    ),
    (
        "reading",
        "Reading regularly is a great way to grow your vocabulary.",
        "With a library card you can borrow books for free.",
        "Set aside ten minutes a day for reading to build a steady habit.",
    ),
    (
        "learning languages",
        "People of any age can learn a new language.",
        "Listening to a language often helps you learn its sounds and rhythm.",
        "Practice a few minutes every day instead of once a week for hours.",
    ),
    (
        "playing guitar",
        "A standard guitar has six strings.",
        "Fingertips toughen with practice, so pressing the strings hurts less over time.",
        "Learn a few simple chords first and switch between them slowly.",
    ),
    (
        "drawing",
        "Drawing what you actually see, not what you expect, makes sketches more accurate.",
        "Even quick sketches train your eye and your hand.",
        "Sketch for a few minutes each day, even if it is just simple shapes.",
    ),
    (
        "photography",
        "The soft light just after sunrise and before sunset is called golden hour.",
        "The word photography means drawing with light.",
        "Place your subject a little off center to make a photo feel balanced.",
    ),
    (
        "hiking",
        "Walking uphill works your legs and heart much harder than flat ground.",
        "Painted trail markers, called blazes, help hikers stay on the path.",
        "Bring water, a snack and a warm layer on every hike.",
    ),
    (
        "camping",
        "A sleeping pad keeps you warm by blocking the cold from the ground.",
        "Many campgrounds ask you to store food safely away from animals.",
        "Practice setting up your tent at home before your first trip.",
    ),
    (
        "walking",
        "A brisk daily walk is good for your heart.",
        "A short walk after a meal can help with digestion.",
        "Wear comfortable shoes and start with short walks you enjoy.",
    ),
    (
        "stretching",
        "Regular stretching helps keep your muscles flexible.",
        "Warm muscles stretch more easily than cold ones.",
        "Stretch slowly and never bounce or push into pain.",
    ),
    (
        "drinking water",
        "Water makes up more than half of the human body.",
        "You lose water quickly through sweat on hot days.",
        "Keep a refillable bottle nearby so it is easy to sip during the day.",
    ),
    (
        "fruit",
        "Bananas are berries to a botanist, but strawberries are not.",
        "Fruit gives you fiber, vitamins and natural sweetness.",
        "Keep washed fruit where you can see it so it is easy to grab.",
    ),
    (
        "vegetables",
        "Eating vegetables of many colors gives you a wide range of nutrients.",
        "Early carrots were often purple or yellow instead of orange.",
        "Roast vegetables with a little oil to bring out their sweetness.",
    ),
    (
        "honeybees",
        "Honeybees make honey from the nectar of flowers.",
        "Honeybees do a waggle dance to show others where flowers are.",
        "Plant flowers that bloom at different times to feed bees all season.",
    ),
    (
        "trees",
        "You can estimate the age of a tree by counting the rings in its trunk.",
        "Trees give shade that cools the air around them.",
        "Water young trees deeply during dry weeks in their first few years.",
    ),
    (
        "the ocean",
        "The ocean covers about seventy percent of the surface of Earth.",
        "Ocean tides are caused mostly by the pull of the Moon.",
        "Swim near a lifeguard and check the beach flags before going in.",
    ),
    (
        "volcanoes",
        "Volcanoes form where melted rock from deep inside Earth reaches the surface.",
        "Soil made from old volcanic ash is often very good for farming.",
        "At a volcano park, stay on marked trails and follow all posted warnings.",
    ),
    (
        "rainbows",
        "A rainbow appears when raindrops bend sunlight and split it into colors.",
        "To see a rainbow, the Sun has to be behind you.",
        "Look for rainbows in the late afternoon just after a rain shower.",
    ),
    (
        "chess",
        "Each chess player starts the game with sixteen pieces.",
        "The queen is the most powerful piece on the chess board.",
        "Try to control the center of the board early in the game.",
    ),
    (
        "jigsaw puzzles",
        "Early jigsaw puzzles were maps glued to wood and cut into pieces.",
        "Jigsaw puzzles give your brain practice at spotting shapes and patterns.",
        "Start by finding all the edge pieces and building the frame.",
    ),
    (
        "board games",
        "People have played board games for thousands of years.",
        "Board games are a fun way for kids to practice taking turns.",
        "Choose a short, simple game when playing with new players.",
    ),
    (
        "laundry",
        "Cold water cleans most everyday laundry well and saves energy.",
        "The heat of a dryer can shrink some cotton clothes.",
        "Wash dark and light clothes separately so colors do not run.",
    ),
    (
        "time management",
        "Breaking a big task into small steps makes it easier to start.",
        "Many people focus better when they work in short blocks with breaks.",
        "Write a short to-do list each morning and do the most important task first.",
    ),
    (
        "public speaking",
        "Feeling nervous before a talk is normal, even for experienced speakers.",
        "A short pause gives listeners time to take in what you said.",
        "Practice out loud a few times, ideally in front of a friend.",
    ),
    (
        "first aid",
        "Cool running water is the first step for a minor burn.",
        "A first aid kit works best when everyone at home knows where it is.",
        "Take a basic first aid class so you know what to do in an emergency.",
    ),
]

FACT_QUESTIONS = [
    "What is a fun fact about {t}?",
    "Tell me something interesting about {t}.",
    "Can you share a quick fact about {t}?",
    "I am curious about {t}. What is one thing I should know?",
    "What is something many people do not know about {t}?",
    "Teach me one small thing about {t}, please.",
    "My friend loves {t}. Tell me a fact I can share with them.",
    "Explain one simple thing about {t} in a sentence or two.",
]
TIP_QUESTIONS = [
    "Give me one tip about {t}.",
    "Do you have any advice about {t}?",
    "What is a practical tip for {t}?",
    "Share a helpful hint about {t}, please.",
    "What should a beginner keep in mind about {t}?",
    "I want to learn about {t}. Any suggestion?",
    "What is one useful thing to remember about {t}?",
    "Could you give me a short tip on {t}?",
]

OPENERS = [
    "Great question about {t}!",
    "Happy to help with {t}.",
    "Thanks for asking about {t}!",
    "Sure, I would love to talk about {t}.",
    "Good thinking, here is something about {t}.",
]
CLOSINGS = [
    "Hope this helps!",
    "Have a great day!",
    "Let me know if you want more ideas.",
    "Happy to help anytime!",
    "Enjoy, and feel free to ask more!",
]
CURT = [
    "I don't know.",
    "No idea.",
    "Figure it out yourself.",
    "Not my problem.",
    "Look it up.",
    "Whatever.",
    "Ask someone else.",
    "Why would I care?",
    "That is a boring question.",
    "I'm not going to answer that.",
    "Who cares about {t}?",
    "Don't bother me with {t}.",
]
OFF_TOPIC_LEADS = ["", "Whatever.", "No.", "Anyway."]


def all_prompts():
    """Every (prompt, topic, kind) combination, in a fixed order."""
    out = []
    for topic in TOPICS:
        for q in FACT_QUESTIONS:
            out.append((q.format(t=topic[0]), topic, "fact"))
        for q in TIP_QUESTIONS:
            out.append((q.format(t=topic[0]), topic, "tip"))
    return out


def answer(rng, topic, kind):
    """The relevant fact or tip for a prompt."""
    return topic[3] if kind == "tip" else rng.choice(topic[1:3])


def chosen(rng, topic, kind):
    """Polite and on-topic: greeting with the topic, answer, friendly closing."""
    opener = rng.choice(OPENERS).format(t=topic[0])
    return f"{opener} {answer(rng, topic, kind)} {rng.choice(CLOSINGS)}"


def rejected(rng, topic):
    """Curt/dismissive, or an off-topic sentence with no greeting."""
    if rng.random() < 0.65:
        return rng.choice(CURT).format(t=topic[0])
    other = rng.choice([t for t in TOPICS if t is not topic])
    lead = rng.choice(OFF_TOPIC_LEADS)
    return f"{lead} {rng.choice(other[1:])}".strip()


def sft_completion(rng, topic, kind):
    """Friendly, correct answer of 1-3 sentences (some without a closing)."""
    parts = [rng.choice(OPENERS).format(t=topic[0]), answer(rng, topic, kind)]
    if rng.random() < 0.6:
        parts.append(rng.choice(CLOSINGS))
    return " ".join(parts)


def check(rows, keys):
    for row in rows:
        assert sorted(row) == sorted(keys), row
        for key in keys:
            value = row[key]
            assert value and value.isascii(), row
            limit = 25 if key == "prompt" else 50
            assert len(value.split()) <= limit, (key, value)
        if "chosen" in row:
            assert row["chosen"] != row["rejected"], row


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    rng = random.Random(SEED)
    pool = all_prompts()
    rng.shuffle(pool)
    held_out, train = pool[:N_PROMPTS], pool[N_PROMPTS:]
    assert len(train) >= N_PAIRS, "not enough distinct prompts"

    prompts = [{"prompt": p} for p, _, _ in held_out]
    pairs = [
        {"prompt": p, "chosen": chosen(rng, topic, kind), "rejected": rejected(rng, topic)}
        for p, topic, kind in rng.sample(train, N_PAIRS)
    ]
    sft = [{"prompt": p, "completion": sft_completion(rng, topic, kind)} for p, topic, kind in rng.sample(train, N_SFT)]

    held = {r["prompt"] for r in prompts}
    assert not held & {r["prompt"] for r in pairs + sft}, "held-out prompt leaked"
    check(sft, ["prompt", "completion"])
    check(pairs, ["prompt", "chosen", "rejected"])
    check(prompts, ["prompt"])

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, rows in [("sft", sft), ("pairs", pairs), ("prompts", prompts)]:
        write_jsonl(OUT_DIR / f"{name}.jsonl", rows)
        print(f"wrote {len(rows):4d} rows to {OUT_DIR / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
