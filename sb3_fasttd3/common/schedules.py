"""Learning-rate schedules beyond SB3's, as functions of ``progress_remaining`` (1 at the start of a run, 0 at its end)."""

from stable_baselines3.common.utils import LinearSchedule


class DelayedLinearSchedule(LinearSchedule):
    """
    ``start`` for the first ``start_fraction`` of the run, then linearly to ``end`` at ``end_fraction``, then
    ``end``: SB3's ``LinearSchedule`` whose fall begins later (``start_fraction=0`` is ``LinearSchedule``). A rate
    held at first learns as fast as the constant rate; falling afterwards, it keeps what was learned.

    :param start: value for the first ``start_fraction`` of the run
    :param end: value from ``end_fraction`` of the run on
    :param start_fraction: fraction of the run (``1 - progress_remaining``) where the fall begins
    :param end_fraction: fraction of the run where ``end`` is reached, with ``0 <= start_fraction < end_fraction <= 1``
    """

    def __init__(self, start: float, end: float, start_fraction: float, end_fraction: float) -> None:
        if not 0.0 <= start_fraction < end_fraction <= 1.0:
            raise ValueError(
                "DelayedLinearSchedule needs 0 <= start_fraction < end_fraction <= 1, "
                f"got start_fraction={start_fraction}, end_fraction={end_fraction}"
            )
        super().__init__(start, end, end_fraction)
        self.start_fraction = start_fraction

    def __call__(self, progress_remaining: float) -> float:
        share = (1.0 - progress_remaining - self.start_fraction) / (self.end_fraction - self.start_fraction)
        return self.start + min(max(share, 0.0), 1.0) * (self.end - self.start)

    def __repr__(self) -> str:
        return (
            f"DelayedLinearSchedule(start={self.start}, end={self.end}, start_fraction={self.start_fraction}, "
            f"end_fraction={self.end_fraction})"
        )
