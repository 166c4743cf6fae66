SETS = {
    "calibration": ["a red circle", "a blue square"],
    "heldout": ["a red circle", "a green triangle", "a blue circle above a red square"],
}


def load_set(name: str) -> list[str]:
    return list(SETS[name])
