"""acg: compile a trained transformer into an alternative computation graph of sparse features, and from there into
readable code, fast code, a pruned network, or dense weights again.

The public API grows with each stage; today: load a testbed model or checkpoint, and evaluate any candidate.
"""

from acg.ir.errors import ACGError

__version__ = "0.1.0"


def load_model(name_or_path):
    """A shipped testbed model by name (`testbed-s`, ...) or a TransformerLens-layout checkpoint folder."""
    from acg.zoo.registry import load

    return load(name_or_path)


def evaluate(model, n: int = 2000, n_backdoor_per_task: int = 500, seed: int = 0) -> dict:
    """`task_acc` per task and `asr` per backdoor family of anything mapping token ids to logits."""
    from acg.roundtrip.evaluate import evaluate as _evaluate

    return _evaluate(model, n, n_backdoor_per_task, seed)


__all__ = ["ACGError", "evaluate", "load_model", "__version__"]
