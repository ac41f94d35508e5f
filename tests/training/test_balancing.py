"""DeepSeek-V3's load balancing: the loads the forward counts, the bias rule, the sequence-wise balance loss, and that
inference and saving leave the bias as it is."""

import pytest
import torch
from conftest import TINY_TEXT_KWARGS

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.modeling_deepseekv3 import expert_load, sequence_balance_loss
from deepseekv3.training.balancing import ExpertLoadBalancer, load_statistics

BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"


def tiny_model(**overrides) -> DeepseekV3MultimodalForConditionalGeneration:
    torch.manual_seed(0)
    return DeepseekV3MultimodalForConditionalGeneration(DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, **overrides))


def router(model):
    return model.model.layers[1].mlp.gate


def test_expert_load_counts_real_tokens_only():
    # 2 rows of 3 positions, top-2 of 4 experts; the last position of row 1 is padding
    indices = (torch.tensor([[0, 1], [0, 2], [3, 0], [1, 2], [1, 3], [0, 1]]),)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(expert_load(indices, mask.float(), 4), torch.tensor([[3.0, 3.0, 2.0, 2.0]]))


def test_sequence_balance_loss_matches_the_v3_formula():
    """Hand-computed f_i and P_i of the V3 report for one sequence, and 1.0 for a perfectly balanced one."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, -2.0]])
    indices = torch.tensor([[0, 3], [1, 0]])
    mask = torch.ones(1, 2)
    scores = logits.sigmoid()
    normalised = scores / scores.sum(dim=-1, keepdim=True)
    probabilities = normalised.mean(dim=0)
    fractions = torch.tensor([2.0, 1.0, 0.0, 1.0]) * 4 / (2 * 2)  # N_r / (K_r T) * tokens per expert
    expected = (fractions * probabilities).sum()
    torch.testing.assert_close(sequence_balance_loss((logits,), (indices,), mask), expected)
    # every expert equally often and equally likely: sum_i (1)(1/N) = 1
    uniform = sequence_balance_loss((torch.zeros(2, 4),), (torch.tensor([[0, 1], [2, 3]]),), mask)
    torch.testing.assert_close(uniform, torch.tensor(1.0))


def test_balance_loss_is_a_training_term_with_router_gradient():
    model = tiny_model(sequence_balance_loss_weight=1e-4).train()
    input_ids = torch.randint(5, 96, (2, 10))
    outputs = model(input_ids=input_ids, labels=input_ids)
    assert outputs.balance_loss.item() > 0
    torch.testing.assert_close(outputs.loss, outputs.lm_loss + outputs.balance_loss)
    outputs.balance_loss.backward()
    assert router(model).weight.grad.abs().sum() > 0
    assert model.eval()(input_ids=input_ids, labels=input_ids).balance_loss is None


def test_skewed_router_loads_converge_toward_uniform():
    """A router that sends every token to 2 of 8 experts (max/mean load 4) is balanced by the bias rule alone."""
    model = tiny_model(router_bias_update_rate=0.01).train()
    with torch.no_grad():  # experts 0 and 2 (different groups) win every top-2 choice at first
        router(model).e_score_correction_bias[[0, 2]] = 0.3
    balancer = ExpertLoadBalancer(model)
    generator = torch.Generator().manual_seed(0)
    for step in range(150):
        input_ids = torch.randint(5, 96, (4, 32), generator=generator)
        with torch.no_grad():
            balancer.observe(model(input_ids=input_ids).expert_load)
        load = balancer.step()[0]
        if step == 0:
            assert (load.max() / load.mean()).item() == pytest.approx(4.0)
        if step in (0, 99):
            balancer.statistics()  # start a new interval: the last 50 steps
    assert balancer.statistics()["expert_load_max_over_mean/layer_1"] < 1.1


def test_bias_rule_moves_each_expert_by_gamma_toward_the_mean():
    model = tiny_model(router_bias_update_rate=0.25)
    balancer = ExpertLoadBalancer(model)
    balancer.observe(torch.tensor([[4.0, 0.0, 2.0, 2.0, 1.0, 3.0, 2.0, 2.0]]))
    balancer.step()
    torch.testing.assert_close(
        router(model).e_score_correction_bias, torch.tensor([-0.25, 0.25, 0.0, 0.0, 0.25, -0.25, 0.0, 0.0])
    )
    with pytest.raises(ValueError, match="expert_load has shape \\(1, 4\\), the model has \\(1, 8\\)"):
        balancer.observe(torch.zeros(1, 4))


def test_load_statistics():
    stats = load_statistics(torch.tensor([[4.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]]), ["layer_1", "layer_2"])
    assert stats["expert_load_max_over_mean/layer_1"] == 2.0
    assert stats["expert_load_cv/layer_1"] == pytest.approx((2.0**0.5) / 2, abs=1e-4)
    assert "expert_load_cv/layer_2" not in stats  # nothing routed there
    assert stats["expert_load_max_over_mean"] == 2.0


def test_inference_leaves_the_bias_untouched():
    model = tiny_model()
    with torch.no_grad():
        router(model).e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    before = router(model).e_score_correction_bias.clone()
    input_ids = torch.randint(5, 96, (2, 8))
    model.eval()
    assert model(input_ids=input_ids).expert_load is None
    model.generate(input_ids=input_ids, max_new_tokens=4, do_sample=False)
    # a training-mode forward counts loads but changes nothing by itself either
    assert model.train()(input_ids=input_ids).expert_load.sum() == 2 * 8 * 2
    torch.testing.assert_close(router(model).e_score_correction_bias, before, rtol=0, atol=0)


def test_bias_round_trips_through_save_pretrained(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        router(model).e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    model.save_pretrained(tmp_path)
    loaded = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(router(loaded).e_score_correction_bias, torch.linspace(-0.1, 0.1, 8))
    input_ids = torch.randint(5, 96, (1, 8))
    torch.testing.assert_close(loaded(input_ids=input_ids).logits, model.eval()(input_ids=input_ids).logits)


def test_no_update_rate_no_balancer_and_no_loads():
    model = tiny_model(router_bias_update_rate=0.0).train()
    assert model(input_ids=torch.randint(5, 96, (1, 8))).expert_load is None
    with pytest.raises(ValueError, match="router_bias_update_rate \\(-0.1\\) must be non-negative"):
        DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, router_bias_update_rate=-0.1)
    with pytest.raises(ValueError, match="no MoE router"):
        ExpertLoadBalancer(
            DeepseekV3MultimodalForConditionalGeneration(
                DeepseekV3MultimodalConfig(**{**TINY_TEXT_KWARGS, "first_k_dense_replace": 2})
            )
        )
