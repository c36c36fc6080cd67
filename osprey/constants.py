"""Token-level constants shared by prompts, model and data (values as in the released Osprey)."""

IGNORE_INDEX = -100
# Placeholder id in input_ids where the image tokens are spliced in (never embedded).
IMAGE_TOKEN_INDEX = -200

IMAGE_TOKEN = "<image>"
MASK_TOKEN = "<mask>"
POS_TOKEN = "<pos>"
REGION_TOKENS = MASK_TOKEN + POS_TOKEN
IMAGE_PREFIX = IMAGE_TOKEN + "\nThis provides an overview of the picture.\n"
