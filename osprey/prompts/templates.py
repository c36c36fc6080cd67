"""Question templates and fixed prompts of Osprey's instruction data, as data.

Training texts are those the reference's data set classes write (github CircleRadon/Osprey,
`osprey/datasets/*.py`), byte for byte, typos included: the released weights were trained on them,
and docs/fidelity.md lists where each comes from. Table A14 (brief questions) and A15 (positive /
negative questions) are transcribed from the paper's supplementary; the inference prompts are those
of the released demo and evaluation scripts. Every template refers to its region by a bare
``<region>`` placeholder (see :mod:`osprey.prompts.regions`); the positive/negative ones also hold
``<category>``.

The reference writes some first turns as ``"<image>.\n..."`` or ``"<image>\n In ..."``; its
``preprocess_multimodal`` then moves ``<image>`` to the front and strips the rest, so the model
saw ``"<image>\n.\n..."`` and ``"<image>\nIn ..."``. The texts here are already in that form.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from osprey.constants import IMAGE_PREFIX, IMAGE_TOKEN
from osprey.prompts.regions import BARE_REGION

CATEGORY_PLACEHOLDER = "<category>"

# Detailed region descriptions (Osprey-724K detailed): the reference's DETAILED_QUESTIONS
# (osprey_724k.py). Table A13 of the supplementary prints a proof-read variant; training used this.
DETAILED_QUESTIONS: tuple[str, ...] = (
    "Can you provide me with a detailed description of the region in the picture marked by <region>?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in detail?",
    "What can you tell me about the region indicated by <region> in the image?",
    "I'd like to know more about the area in the photo labeled <region>. Can you give me a detailed description?",
    "Could you describe the region shown as <region> in the picture in great detail?",
    "What details can you give me about the region outlined by <region> in the photo?",
    "Please provide me with a comprehensive description of the region marked with <region> in the image.",
    "Can you give me a detailed account of the region labeled as <region> in the picture?",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it in detail?",
    "What is the region outlined by <region> in the picture like? Could you give me a detailed description?",
    "Can you provide me with a detailed description of the region in the picture marked by <region>, please?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in detail, please?",
    "What can you tell me about the region indicated by <region> in the image, exactly?",
    "I'd like to know more about the area in the photo labeled <region>, please. Can you give me a detailed description?",
    "Could you describe the region shown as <region> in the picture in great detail, please?",
    "What details can you give me about the region outlined by <region> in the photo, please?",
    "Please provide me with a comprehensive description of the region marked with <region> in the image, please.",
    "Can you give me a detailed account of the region labeled as <region> in the picture, please?",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it in detail, please?",
    "What is the region outlined by <region> in the picture like, please? Could you give me a detailed description?",
    "Please describe the region <region> in the image in detail.",
    "Can you offer a thorough analysis of the region <region> in the image?",
    "Could you elaborate on the region highlighted by <region> in the picture provided?",
    "Please share more information about the zone emphasized with <region> in the photo.",
    "What insights can you give ablout the area denoted by <region> in the image presented?",
    "Can you share a comprehensive rundown of the region denoted by <region> in the presented image?",
    "I'd like to know more about the region highlighted by <region> in the picture provided.",
    "Work through the important details of the area <region> in the image.",
    "Illustrate the area represtented by <region> through a descriptive explanation.",
    "Examine the region <region> closely and share its details.",
)

# Visual Genome region captions: the reference's own list (vg.py), not Table A14, each followed by
# VG_SHORT_PHRASE_SUFFIX.
VG_QUESTIONS: tuple[str, ...] = (
    "Give me a short description of <region>.",
    "Can you give me a short description of <region>?",
    "Can you provide me with a short description of the region in the picture marked by <region>?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in few words?",
    "What can you tell me about the region indicated by <region> in the image in few words?",
    "I'd like to know more about the area in the photo labeled <region>. Can you give me a concise description?",
    "Could you describe the region shown as <region> in the picture concisely?",
    "What can you give me about the region outlined by <region> in the photo?",
    "Please provide me with a brief description of the region marked with <region> in the image.",
    "Can you give me a brief introduction of the region labeled as <region> in the picture?",
    "I'm interested in knowing the region represented by <region> in the photo. Can you describe it in several words?",
    "What is the region outlined by <region> in the picture like? Could you give me a streamlined description?",
    "Can you provide me with a brief description of the region in the picture marked by <region>, please?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in few words, please?",
    "What can you tell me about the region indicated by <region> in the image?",
    "I'd like to know more about the area in the photo labeled <region>, please. Can you give me a simple description?",
    "Could you describe the region shown as <region> in the picture in several words?",
    "Please provide me with a simple description of the region marked with <region> in the image, please.",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it in few words, please?",
    "What is the region outlined by <region> in the picture like, please? Could you give me a simple and clear description?",
    "Please describe the region <region> in the image concisely.",
    "Can you offer a simple analysis of the region <region> in the image?",
    "Could tell me something about the region highlighted by <region> in the picture briefly?",
    "Can you share a simple rundown of the region denoted by <region> in the presented image?",
)
VG_SHORT_PHRASE_SUFFIX = " Answer the question using a short phrase."

# Table A14: brief mask-region description.
BRIEF_QUESTIONS: tuple[str, ...] = (
    "Please give me a short description of region <region>.",
    "Can you give me a short description of <region>?",
    "Can you provide me with a short description of the region in the picture marked by <region>?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in few words?",
    "What can you tell me about the region indicated by <region> in the image in few words?",
    "I'd like to know more about the area in the photo labeled <region>. Can you give me a concise description?",
    "Could you describe the region shown as <region> in the picture concisely?",
    "What can you give me about the region outlined by <region> in the photo?",
    "Please provide me with a brief description of the region marked with <region> in the image.",
    "Can you give me a brief introduction of the region labeled as <region> in the picture?",
    "I'm interested in knowing the region represented by <region> in the photo. Can you describe it in several words?",
    "What is the region outlined by <region> in the picture like? Could you give me a streamlined description?",
    "Can you provide me with a brief description of the region in the picture marked by <region> please?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in few words please?",
    "What can you tell me about the region indicated by <region> in the image?",
    "I'd like to know more about the area in the photo labeled <region> please. Can you give me a simple description?",
    "Could you describe the region shown as <region> in the picture in several words?",
    "What attributes can you give me about the region outlined by <region> in the photo please?",
    "Please provide me with a simple description of the region marked with <region> in the image please.",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it in few words please?",
    "What is the region outlined by <region> in the picture like please? Could you give me a simple and clear description?",
    "Please describe the region <region> in the image concisely.",
    "Can you offer a simple analysis of the region <region> in the image?",
    "Could tell me something about the region highlighted by <region> in the picture briefly?",
    "Please share some information about the zone emphasized with <region> in the photo.",
    "What insights can you give about the area denoted by <region> in the image presented?",
    "Can you share a simple rundown of the region denoted by <region> in the presented image?",
    "I'd like to know some attributes about the region highlighted by <region> in the picture provided.",
    "Work through the important attributes of the area <region> in the image.",
    "Illustrate the area represented by <region> with some important attributes.",
)

# Table A15: positive/negative category questions; the answer is yes or no.
POSITIVE_NEGATIVE_QUESTIONS: tuple[str, ...] = (
    "<category> is the category of <region>, right?",
    "Is the category of <region> <category>?",
    "Does this area <region> belong to category <category>?",
    "Is <category> the appropriate classification for this area <region>?",
    "Does category <category> accurately describe this region <region>?",
    "The category of <region> is <category>, right?",
    "Is this area <region> classified under category <category>?",
    "Is it correct to say this area <region> falls into category <category>?",
    "Is the classification of this region <region> aligned with category <category>?",
)

# Appended to short-form and part-level questions of Osprey-724K.
SHORT_ANSWER_SUFFIX = " Answer the question using a single word or phrase."

# Inference prompts (one region each) of the released demo and LVIS/PACO evaluation.
SHORT_CAPTION_PROMPT = "Please give me a short description of <region>. Using a short phrase."
DETAILED_PROMPT = "Can you give me a detailed description of <region>?"
CATEGORY_PROMPT = "What is the category of <region>? Using only one word or phrase."

# Stage 2 (stage2_data.py): the first human turn is "<image>\n" + the data set's instruction +
# the region, later turns the region alone; the answer is the category name or the referring
# expression. The explicit "<image>\n" keeps the tokeniser from adding the stage-3 overview line.
STAGE2_QUESTION = BARE_REGION
STAGE2_CATEGORY_INSTRUCTION = (
    "In the conversation below, you simply answer the category name based on what you see in the "
    "imagery inside a particular region. I will give you only one region each time.\n"
)
# RefCOCO(g): no newline before the region, as the reference writes it.
STAGE2_REFERRING_INSTRUCTION = (
    "I will provide you with only one region containing only one object, although there may be "
    "other objects present in the image. It is recommended that you describe the object's relative "
    "position with respect to other objects in the image, as well as its position within the image "
    "and its basic attributes."
)
# RefCOCO+ expressions avoid absolute positions, so its instruction asks for none.
STAGE2_REFERRING_NO_POSITION_INSTRUCTION = (
    "I will provide you with only one region containing only one object, although there may be "
    "other objects present in the image. It is recommended that you describe the object's relative "
    "position with respect to other objects in the image and its basic attibuts, you should not "
    "give its position within the image."
)

# The part data sets' fixed class lists: every sample's instruction names all of them.
PASCAL_PART_CATEGORIES: tuple[str, ...] = (
    "potted plant", "aeroplane", "cow", "cat", "bus", "horse", "car",
    "dog", "bicycle", "person", "bird", "bottle", "sheep", "motorbike",
)  # fmt: skip
PASCAL_PART_PARTS: tuple[str, ...] = (
    "eye", "window", "cap", "headlight", "hand", "mirror", "arm", "plant",
    "wheel", "ear", "pot", "foot", "leg", "nose", "body", "horn", "handlebar",
    "neck", "license plate", "paw", "saddle", "head", "muzzle", "tail", "wing",
    "beak", "hair", "torso", "door", "mouth",
)  # fmt: skip
PART_IMAGENET_CATEGORIES: tuple[str, ...] = (
    "Bottle", "Biped", "Quadruped", "Fish", "Reptile", "Bicycle", "Bird", "Car", "Boat", "Snake",
    "Aeroplane",
)  # fmt: skip
PART_IMAGENET_PARTS: tuple[str, ...] = (
    "Tier", "Hand", "Wing", "Mouth", "Tail", "Side", "Fin", "Engine", "Foot", "Head", "Body",
    "Sail", "Seat",
)  # fmt: skip


def stage2_part_instruction(categories: Sequence[str], parts: Sequence[str], separator: str) -> str:
    """Stage-2 instruction for part data sets; answers are ``category{separator}part``.

    PascalPart answers ``object:part`` (separator ``":"``), PartImageNet ``object part`` (``" "``).
    The wording ("what you seein", "It maybe", "should in the format") and the list joins (classes
    by ", ", parts by ",") are the reference's.
    """
    if not categories or not parts:
        raise ValueError(f"need categories and parts, got {list(categories)!r}, {list(parts)!r}")
    return (
        "In the conversation below, you simply answer the category and subcategory name based on "
        "what you seein the image inside a particular region. It maybe a subpart of an object. "
        "I will give you only one region each time. Your answer should in the format of "
        f"category{separator}subcategory. Categories Containing {', '.join(categories)}. "
        f"Subcategories Containing {','.join(parts)}.\n"
    )


PASCAL_PART_INSTRUCTION = stage2_part_instruction(PASCAL_PART_CATEGORIES, PASCAL_PART_PARTS, ":")
PART_IMAGENET_INSTRUCTION = stage2_part_instruction(
    PART_IMAGENET_CATEGORIES, PART_IMAGENET_PARTS, " "
)


def regions_overview(num_regions: int) -> str:
    """Opening of an Osprey-724K conversation that shows each mask once as regionK<regionK>.

    "Ther are" (sic) for any count, "region"/"regions" by count, as the reference writes it.
    """
    if num_regions < 1:
        raise ValueError(f"num_regions must be >= 1, got {num_regions}")
    listed = ",".join(f"region{i}<region{i}>" for i in range(1, num_regions + 1))
    if num_regions == 1:
        return f"Ther are 1 part region in the picture: {listed}. "
    return f"Ther are {num_regions} part regions in the picture: {listed}. "


# VCR (vcr.py): the first question opens with this image line ("<image>.\n" as written, "<image>\n.\n"
# once moved), then one of VCR_REFERENCE_WAYS with <region> replaced by the region list, then the
# question; the second question is one of VCR_WHY_QUESTIONS.
VCR_IMAGE_LINE = IMAGE_TOKEN + "\n." + IMAGE_PREFIX[len(IMAGE_TOKEN) :]
VCR_REFERENCE_WAYS: tuple[str, ...] = (
    "There are <region> in the image,",
    "There are some regions <region>,",
    "Given <region>,",
    "Given <region> in the image,",
    "<region>,",
    "Several regions <region> are in the image,",
    "<region> in the given image,",
)
VCR_WHY_QUESTIONS: tuple[str, ...] = (
    "why?",
    "why",
    "What's the rationale for your decision?",
    "What led you to that conclusion?",
    "What's the reasoning behind your opinion?",
    "Why do you believe that to be true?",
    "Can you explain the basis for your thinking?",
    "What factors influenced your perspective?",
    "How did you arrive at that perspective?",
    "What evidence supports your viewpoint?",
    "What makes you think that way?",
    "What's the logic behind your argument?",
    "Can you provide some context for your opinion?",
    "What's the basis for your assertion?",
    "Why do you hold that belief?",
    "What experiences have shaped your perspective?",
    "What assumptions underlie your reasoning?",
    "What's the foundation of your assertion?",
    "What's the source of your reasoning?",
    "What's the motivation behind your decision?",
    "What's the impetus for your belief?",
    "What's the driving force behind your conclusion?",
    "Why do you think that?",
    "What's your reasoning?",
    "What makes you say that?",
    "Why do you feel that way?",
    "What's the story behind that?",
    "What's your thought process?",
    "What's the deal with that?",
    "What's the logic behind it?",
    "Why do you believe that?",
    "What's the real deal here?",
    "What's the reason behind it?",
    "What's the thought process behind your decision?",
    "What's the rationale for your opinion?",
    "Why do you have that impression?",
    "What's the background to that?",
    "What's the evidence that supports your view?",
    "What's the explanation for that?",
)


def vcr_opening(num_regions: int, way: str) -> str:
    """The first VCR question's prefix: image line, then ``way`` naming "region1 <region1>,..."."""
    if num_regions < 1:
        raise ValueError(f"num_regions must be >= 1, got {num_regions}")
    if way not in VCR_REFERENCE_WAYS:
        raise ValueError(f"{way!r} is not one of VCR_REFERENCE_WAYS")
    listed = ",".join(f"region{i} <region{i}>" for i in range(1, num_regions + 1))
    return VCR_IMAGE_LINE + way.replace(BARE_REGION, listed)


def choose(templates: Sequence[str], rng: random.Random) -> str:
    """One template drawn with ``rng``, so a seeded data pipeline draws the same questions."""
    if not templates:
        raise ValueError("cannot choose from an empty template list")
    return rng.choice(templates)


def fill_category(template: str, category: str) -> str:
    """A positive/negative template with its ``<category>`` filled in."""
    if CATEGORY_PLACEHOLDER not in template:
        raise ValueError(f"template has no {CATEGORY_PLACEHOLDER}: {template!r}")
    return template.replace(CATEGORY_PLACEHOLDER, category)
