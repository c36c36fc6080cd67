"""The demo's training lines: about ten a stage, each the mean loss of the steps it covers."""

from types import SimpleNamespace

from osprey.train.progress import MetricFollower


class FakeHistory:
    """get_metric_history as MLflow answers it, growing as training logs."""

    def __init__(self) -> None:
        self.points: dict[str, list] = {"loss": [], "tokens_per_s": []}

    def log(self, step: int, loss: float) -> None:
        self.points["loss"].append(SimpleNamespace(step=step, value=loss))
        self.points["tokens_per_s"].append(SimpleNamespace(step=step, value=1000.0 + step))

    def get_metric_history(self, run_id: str, key: str) -> list:
        return list(self.points[key])


def follow(total: int, batches: list[range], resumed_at: int = 0) -> list[str]:
    history = FakeHistory()
    for step in range(1, resumed_at + 1):
        history.log(step, 99.0)
    lines: list[str] = []
    follower = MetricFollower(
        SimpleNamespace(client=history), "run", stage="stage3", total_steps=total,
        interval=3600, write=lines.append,
    )  # fmt: skip
    with follower:
        for batch in batches:
            for step in batch:
                history.log(step, float(step))
            follower.poll()
    return lines


def test_a_long_stage_prints_about_ten_lines_of_mean_losses():
    lines = follow(169, [range(1, 50), range(50, 51), range(51, 170)])
    assert len(lines) == 10
    assert lines[0].startswith("  stage3 steps 1-17/169 loss 9.0000, 1,017 tokens/s")
    assert lines[-1].startswith("  stage3 steps 154-169/169 loss 161.5000, 1,169 tokens/s")


def test_a_short_stage_prints_each_step_and_a_resumed_one_only_what_is_new():
    lines = follow(5, [range(1, 6)])
    assert [line.split(" loss")[0] for line in lines] == [
        f"  stage3 step {k}/5" for k in range(1, 6)
    ]
    resumed = follow(30, [range(21, 31)], resumed_at=20)
    assert len(resumed) == 4
    assert resumed[0].startswith("  stage3 step 21/30 loss 21.0000")
    assert resumed[-1].startswith("  stage3 steps 28-30/30 loss 29.0000")
