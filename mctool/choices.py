"""The words that options of a few choices take, in one place that imports nothing: the command line builds
its options and help from them at start-up, before torch is imported."""

CURVES = ("bezier", "polychain", "line")
BEND_INITS = ("linear", "start", "end")
AUGMENTS = ("auto", "none", "crop", "crop-flip")
SPLITS = ("test", "val")  # evaluated on: the official test set, or images held out from training
#: ``--bn-data``: the training images of a BN pass augmented as in training (the statistics the network's
#: layers were trained to expect, which its stored running statistics also average), or as they are.
BN_DATA = ("augmented", "plain")
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("paper", "cosine", "constant", "sse")
ALIGN_METHODS = ("weights", "activations")
