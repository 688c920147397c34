"""The losses and Q-values of the updates between two log dumps, summed on the device."""

import torch as th


class UpdateStatistics:
    """
    Sums of the critic loss, the mean Q-value and the actor loss over the updates since the last read, and how
    many updates of each kind: kept in one tensor on the device, so that logging costs one host read per dump
    instead of one per update.

    :param device: where the updates run
    """

    FIELDS = ("critic_loss", "q_mean", "critic_updates", "actor_loss", "actor_updates")

    def __init__(self, device: th.device):
        self.sums = th.zeros(len(self.FIELDS), device=device)
        self._one = th.ones((), device=device)

    def add_critic_update(self, critic_loss: th.Tensor, q_mean: th.Tensor) -> None:
        self.sums[:3] += th.stack([critic_loss.detach().float(), q_mean.detach().float(), self._one])

    def add_actor_update(self, actor_loss: th.Tensor) -> None:
        self.sums[3:] += th.stack([actor_loss.detach().float(), self._one])

    def means(self) -> dict[str, float]:
        """The mean of each statistic over the updates since the last call (absent without such updates); resets."""
        sums = dict(zip(self.FIELDS, self.sums.tolist(), strict=True))
        self.sums.zero_()
        means = {}
        if sums["critic_updates"] > 0:
            means["critic_loss"] = sums["critic_loss"] / sums["critic_updates"]
            means["q_mean"] = sums["q_mean"] / sums["critic_updates"]
        if sums["actor_updates"] > 0:
            means["actor_loss"] = sums["actor_loss"] / sums["actor_updates"]
        return means
