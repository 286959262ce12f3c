"""Small helpers shared by tests."""
import robustbench_med as rbm


def tiny_cnn_victim():
    return rbm.create_victim("cnn.phantom", weights=None)


class MaskSplit:
    """An in-memory segmentation split (images, masks, sensitive attributes): what a harness hands to
    ``Defense.prepare`` as ``train``. ``female`` marks each sample's sex; age groups alternate young / old."""

    def __init__(self, x, m, female) -> None:
        self.x, self.m, self.female = x, m, female

    def __len__(self) -> int:
        return len(self.x)

    def images(self, idx=None):
        return self.x if idx is None else self.x[idx]

    def targets(self, field, idx=None):
        return self.m if idx is None else self.m[idx]

    def attributes(self, idx=None):
        rows = range(len(self.x)) if idx is None else [int(i) for i in idx]
        return {"sex": ["F" if self.female[i] else "M" for i in rows], "age_group": [("young", "old")[i % 2] for i in rows]}
