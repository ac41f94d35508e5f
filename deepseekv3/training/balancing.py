"""DeepSeek-V3's auxiliary-loss-free load balancing, applied by the training loop.

The model's forward returns, in training mode, how many real tokens each expert of each MoE layer received
(`expert_load`, counted from the router's own top-k choice). `ExpertLoadBalancer` sums those loads over the
micro-batches of one optimizer step, all-reduces them over the data-parallel ranks, and then moves every MoE layer's
`e_score_correction_bias` by `gamma * sign(mean load - load)` (DeepSeek-V3 report, section 2.1.2): overloaded experts
become less attractive to the top-k choice, underloaded ones more. The bias only steers which experts are chosen (the
gating weights come from the unbiased scores), it has no gradient, and nothing but `step()` changes it, so inference
never does. Every rank applies the same update to the same bias, so the biases stay identical across ranks.

`DeepseekV3Trainer` runs a balancer by itself; in a plain loop (Accelerate, DDP, FSDP2), call `observe` after each
forward and `step` after each `optimizer.step()`.
"""

import torch
import torch.distributed as dist
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

__all__ = ["ExpertLoadBalancer", "load_statistics"]


def load_statistics(load: torch.Tensor, layer_names: list[str]) -> dict[str, float]:
    """Per MoE layer, `max/mean` load and the coefficient of variation (std/mean) of the experts' loads.

    Args:
        load (`torch.Tensor` of shape `(num_moe_layers, num_experts)`): tokens per expert.
        layer_names (`list[str]`): one name per row, used in the keys.

    Returns:
        `dict[str, float]`: `expert_load_max_over_mean/<layer>` and `expert_load_cv/<layer>` for every layer whose
        load is not all zero, plus their worst values over layers (`expert_load_max_over_mean`, `expert_load_cv`).
    """
    stats = {}
    mean = load.mean(dim=-1)
    counted = mean > 0
    max_over_mean = load.max(dim=-1).values / mean.clamp(min=1e-12)
    cv = load.std(dim=-1, unbiased=False) / mean.clamp(min=1e-12)
    for name, is_counted, ratio, variation in zip(layer_names, counted, max_over_mean, cv):
        if is_counted:
            stats[f"expert_load_max_over_mean/{name}"] = round(ratio.item(), 4)
            stats[f"expert_load_cv/{name}"] = round(variation.item(), 4)
    if bool(counted.any()):
        stats["expert_load_max_over_mean"] = round(max_over_mean[counted].max().item(), 4)
        stats["expert_load_cv"] = round(cv[counted].max().item(), 4)
    return stats


class ExpertLoadBalancer:
    """The bias rule of DeepSeek-V3's auxiliary-loss-free balancing, for any training loop (see the module docstring).

    Args:
        model (`nn.Module`): the model (or a PEFT / DDP / FSDP wrapper of it) whose MoE routers to balance.
        update_rate (`float`, *optional*): `gamma`; defaults to the model config's `router_bias_update_rate`.
        process_group (*optional*): the data-parallel group the loads are all-reduced over; defaults to the whole
            world when `torch.distributed` is initialised.
        all_reduce (`bool`, *optional*, defaults to `True`): `False` keeps each rank's own loads (a pipeline stage
            without data-parallel replicas, whose layers no other rank holds).

    Example (a plain Accelerate loop):

    ```python
    balancer = ExpertLoadBalancer(model)
    for batch in dataloader:
        with accelerator.accumulate(model):
            outputs = model(**batch)
            balancer.observe(outputs.expert_load)
            accelerator.backward(outputs.loss)
            optimizer.step()
            if accelerator.sync_gradients:
                balancer.step()
            optimizer.zero_grad()
    ```
    """

    def __init__(
        self, model: nn.Module, update_rate: float | None = None, process_group=None, all_reduce: bool = True
    ):
        named = [(name, module) for name, module in model.named_modules() if isinstance(module, DeepseekV3TopkRouter)]
        if not named:
            raise ValueError("the model has no MoE router (DeepseekV3TopkRouter) to balance")
        self.routers = [module for _, module in named]
        # "model.layers.3.mlp.gate" -> "layer_3"
        self.layer_names = [f"layer_{name.split('layers.')[-1].split('.')[0]}" for name, _ in named]
        if update_rate is None:
            config = getattr(getattr(model, "module", model), "config", None)  # DDP keeps the model as `.module`
            update_rate = getattr(config, "router_bias_update_rate", None)
            if update_rate is None:
                raise ValueError("pass update_rate: the model's config has no router_bias_update_rate")
        if update_rate < 0:
            raise ValueError(f"update_rate ({update_rate}) must be non-negative")
        self.update_rate = update_rate
        self.process_group = process_group
        self.all_reduce = all_reduce
        bias = self.routers[0].e_score_correction_bias
        self._step_load = torch.zeros(len(self.routers), bias.numel(), device=bias.device)
        self._interval_load = torch.zeros_like(self._step_load)

    def observe(self, expert_load: torch.Tensor | None) -> None:
        """Add one forward's `expert_load` (`(num_moe_layers, num_experts)`, or None: nothing counted) to the step."""
        if expert_load is None:
            return
        if expert_load.shape != self._step_load.shape:
            raise ValueError(
                f"expert_load has shape {tuple(expert_load.shape)}, the model has {tuple(self._step_load.shape)} "
                "(MoE layers, routed experts)"
            )
        self._step_load += expert_load.detach().to(self._step_load.device, torch.float32)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Apply the bias rule to the loads observed since the last call (call it after every optimizer step, on
        every rank: it all-reduces). A layer that routed no token this step keeps its bias.

        Returns:
            `torch.Tensor` of shape `(num_moe_layers, num_experts)`: the step's loads, summed over ranks.
        """
        load = self._step_load
        if self.all_reduce and dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=self.process_group)
        for router, layer_load in zip(self.routers, load):
            bias = router.e_score_correction_bias
            # sign(0) = 0: a layer without tokens, or an expert exactly at the mean, stays where it is
            bias.add_(self.update_rate * torch.sign(layer_load.mean() - layer_load).to(bias.device, bias.dtype))
        self._interval_load += load
        self._step_load = torch.zeros_like(load)
        return load

    def statistics(self) -> dict[str, float]:
        """`load_statistics` of the loads of every step since the last call (identical on every rank), then reset."""
        stats = load_statistics(self._interval_load, self.layer_names)
        self._interval_load.zero_()
        return stats
