"""PaddleOCR-compatible DB detectors: backbones, necks, the DB head, and the named constructors in ``zoo``."""
