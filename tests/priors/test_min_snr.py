"""Min-SNR-gamma weighting of the prior's epsilon loss (priors.losses.min_snr_weight)."""

import torch

from magic3d.priors.losses import min_snr_weight


def test_min_snr_weight_caps_clean_steps_and_keeps_noisy_ones():
    # SNR = a / (1 - a): 0.25 -> 1/3, 0.5 -> 1, 0.99 -> 99, 0.9999 -> 9999.
    alpha_bar = torch.tensor([0.25, 0.5, 0.99, 0.9999])
    weight = min_snr_weight(alpha_bar, gamma=5.0)
    snr = alpha_bar / (1 - alpha_bar)
    # Noisy steps (SNR below gamma) keep weight 1; clean ones get gamma / SNR.
    expected = torch.where(snr < 5.0, torch.ones_like(snr), 5.0 / snr)
    torch.testing.assert_close(weight, expected, rtol=1e-5, atol=0)  # fp32 division only
    assert weight[0] == 1.0 and weight[-1] < 1e-3


def test_no_gamma_is_the_plain_mse():
    alpha_bar = torch.rand(16).clamp(0.01, 0.99)
    assert torch.equal(min_snr_weight(alpha_bar, None), torch.ones(16))


def test_shipped_configs_use_min_snr_and_old_states_do_not():
    from magic3d.priors.configs import PriorConfig, default_config

    assert default_config("pixel").min_snr_gamma == 5.0
    assert default_config("latent").min_snr_gamma == 5.0
    old = default_config("pixel").to_dict()
    old.pop("min_snr_gamma")  # a train state written before the option existed
    assert PriorConfig.from_dict(old).min_snr_gamma is None


def test_v_weight_gives_the_same_x0_weight_as_epsilon():
    # The epsilon MSE is SNR x the x0 MSE and the v MSE is (SNR + 1) x the x0 MSE: with Min-SNR
    # both must weight the x0 error by min(SNR, gamma).
    alpha_bar = torch.tensor([0.01, 0.25, 0.5, 0.9, 0.99])
    snr = alpha_bar / (1 - alpha_bar)
    x0_weight = torch.minimum(snr, torch.tensor(5.0))
    torch.testing.assert_close(min_snr_weight(alpha_bar, 5.0, "epsilon") * snr, x0_weight, rtol=1e-5, atol=0)
    torch.testing.assert_close(min_snr_weight(alpha_bar, 5.0, "v_prediction") * (snr + 1), x0_weight, rtol=1e-5, atol=0)


def test_old_states_predict_epsilon():
    from magic3d.priors.configs import PriorConfig, default_config

    old = default_config("pixel").to_dict()
    old.pop("prediction_type")  # written before v prediction existed (every prior shipped up to 2026-12-03)
    assert PriorConfig.from_dict(old).prediction_type == "epsilon"
