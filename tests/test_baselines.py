"""The baselines against their references' formulas, worked by hand.

- MC-Net+ (ycwu1997/MC-Net, code/train_mcnet_{2d,3d}.py, utils/losses.py, networks/): per-class
  sharpening p^(1/T) / (p^(1/T) + (1 - p)^(1/T)) with T = 0.1, the consistency summed over every
  ordered pair i != j of mean((p_i - sharpen(p_j))^2) with the targets not detached, Dice-only
  supervision, the weight schedule, and three decoders that differ only in their up-sampling.
- URPC (HiLab-git/SSL4MIS, networks/unet.py UNet_URPC, networks/unet_3D_dv_semi.py): the decoder
  perturbations before the auxiliary heads are active in train() and the identity in eval().
- UAMT (SSL4MIS train_uncertainty_aware_mean_teacher_2D.py): threshold
  (0.75 + 0.25 * sigmoid_rampup(t, t_max)) * ln 2 for any number of classes.
- Every baseline exports: the served graph is E + G1 only, equal to PyTorch's eval output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sfpc.inference.contract import ModelMetadata
from sfpc.model.export import export_model, parity
from sfpc.model.networks import (
    NetConfig,
    SFPCNet,
    URPCDropout,
    URPCFeatureDropout,
    URPCFeatureNoise,
)
from sfpc.model.unet import Decoder
from sfpc.training.losses import (
    binary_dice_loss,
    mcnet_consistency_weight,
    mcnet_dice_loss_2d,
    mcnet_pairwise_loss,
    mcnet_supervised_loss,
    sharpen_per_class,
    uamt_threshold,
)
from sfpc.training.methods import LossConfig, Method, TrainStep, net_config_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = (4, 8, 16, 32, 64)


def _probs(*pixels: tuple[float, ...]) -> torch.Tensor:
    """Class probabilities of single pixels -> (1, K, 1, n) float64."""
    return torch.tensor(pixels, dtype=torch.float64).t().reshape(1, len(pixels[0]), 1, -1)


def _net(method: str, spatial_dims: int, **kw) -> SFPCNet:
    base = NetConfig(spatial_dims=spatial_dims, num_classes=3, channels=SMALL, **kw)
    return SFPCNet(net_config_for(method, base, LossConfig()))


# -- MC-Net+: sharpening and the pairwise consistency ------------------------------------------


def test_sharpening_is_per_class_and_not_renormalised():
    # T = 0.1, so p^(1/T) = p^10:
    #   0.6 -> 0.6^10 / (0.6^10 + 0.4^10) = 3^10 / (3^10 + 2^10) = 59049 / 60073 = 0.98295407...
    #   0.4 -> 2^10 / (2^10 + 3^10)      = 1024 / 60073                      = 0.01704592...
    #   0.5 -> 1/2 (p = 1 - p)
    #   0.3 -> 3^10 / (3^10 + 7^10) = 59049 / 282534298       = 2.0899763e-4
    #   0.2 -> 2^10 / (2^10 + 8^10) = 1 / (1 + 4^10) = 1 / 1048577 = 9.536734e-7
    # The K = 3 pixel's sharpened values sum to 0.50020995, not 1: no renormalisation over
    # classes (a renormalised sharpening would give 0.5^10 / (0.5^10 + 0.3^10 + 0.2^10) = 0.994).
    out = sharpen_per_class(_probs((0.6, 0.4)), 0.1).flatten()
    assert out.tolist() == pytest.approx([59049 / 60073, 1024 / 60073], abs=1e-12)
    out3 = sharpen_per_class(_probs((0.5, 0.3, 0.2)), 0.1).flatten()
    assert out3.tolist() == pytest.approx([0.5, 59049 / 282534298, 1 / 1048577], rel=1e-9)
    assert float(out3.sum()) == pytest.approx(0.5002099513, abs=1e-9)


def test_pairwise_consistency_two_decoders_by_hand():
    # p1 = (0.6, 0.4), p2 = (0.5, 0.5); s = sharpen(0.6) = 59049/60073, sharpen(p2) = p2.
    # L = mean((p1 - sharpen(p2))^2) + mean((p2 - sharpen(p1))^2)
    #   = mean(0.1^2, 0.1^2) + mean((0.5 - s)^2, (0.5 - (1 - s))^2)
    #   = 0.01 + (s - 0.5)^2 = 0.01 + 0.48295407^2 = 0.24324464
    p1, p2 = _probs((0.6, 0.4)), _probs((0.5, 0.5)).requires_grad_(True)
    loss = mcnet_pairwise_loss([p1, p2], 0.1)
    assert float(loss.detach()) == pytest.approx(0.2432446361878689, abs=1e-12)
    # The target is not detached: d/dp2 of mean((p1 - sharpen(p2))^2) is
    # -(p1_k - sharpen(p2_k)) * sharpen'(p2_k) (mean over 2 classes, times 2 from the square),
    # and sharpen'(0.5) = 1/T = 10 (sharpen = 1 / (1 + ((1-p)/p)^10): -10/4 * -1/p^2 at p = 0.5).
    # The second term gives (p2_k - sharpen(p1_k)). Class 0: -(0.1)(10) + (0.5 - s) = -1.48295;
    # class 1: -(-0.1)(10) + (0.5 - (1 - s)) = +1.48295. Detached targets would give -/+0.48295.
    loss.backward()
    assert p2.grad.flatten().tolist() == pytest.approx([-1.48295407254507, 1.48295407254507],
                                                       abs=1e-10)


def test_pairwise_consistency_three_decoders_every_ordered_pair():
    # p1 = (0.6, 0.4), p2 = (0.5, 0.5), p3 = (0.9, 0.1); sharpened: s1 = (a, 1 - a) with
    # a = 59049/60073 = 0.98295407, s2 = (0.5, 0.5), s3 = (b, 1 - b) with b = 9^10 / (9^10 + 1)
    # = 0.99999999971. Each term is the mean over the two classes, so for K = 2 it is
    # (x - y)^2 where x, y are the class-0 values:
    #   (1,2): (0.6 - 0.5)^2 = 0.01            (1,3): (0.6 - b)^2 = 0.15999999977
    #   (2,1): (0.5 - a)^2   = 0.23324464      (2,3): (0.5 - b)^2 = 0.24999999971
    #   (3,1): (0.9 - a)^2   = 0.00688138      (3,2): (0.9 - 0.5)^2 = 0.16
    # sum = 0.82012601
    probs = [_probs((0.6, 0.4)), _probs((0.5, 0.5)), _probs((0.9, 0.1))]
    a, b = 59049 / 60073, 9**10 / (9**10 + 1)
    by_hand = (0.01 + (0.6 - b) ** 2 + (0.5 - a) ** 2 + (0.5 - b) ** 2 + (0.9 - a) ** 2 + 0.16)
    assert by_hand == pytest.approx(0.8201260138234467, abs=1e-12)
    assert float(mcnet_pairwise_loss(probs, 0.1)) == pytest.approx(by_hand, abs=1e-12)


def test_mcnet_dice_supervision_by_hand():
    # Two pixels, labels (0, 1), p = (0.8, 0.2) and (0.4, 0.6).
    # 2D reference DiceLoss (no factor 2): class 0: 1 - 0.8 / (0.8^2 + 0.4^2 + 1) = 1 - 0.8/1.8
    # = 5/9; class 1: 1 - 0.6 / (0.2^2 + 0.6^2 + 1) = 1 - 0.6/1.4 = 4/7; mean = 71/126.
    # 3D Binary_dice_loss on the foreground: 1 - 2 * 0.6 / (0.2 + 0.6 + 1) = 1 - 1.2/1.8 = 1/3.
    p = _probs((0.8, 0.2), (0.4, 0.6))
    y = torch.tensor([[[0, 1]]])
    assert float(mcnet_dice_loss_2d(p, y)) == pytest.approx(71 / 126, abs=1e-9)
    assert float(binary_dice_loss(p[:, 1], (y == 1).double())) == pytest.approx(1 / 3, abs=1e-8)
    # Summed over the decoders; lambda = 1 in 2D, 0.5 in 3D (the reference's --lamda).
    assert float(mcnet_supervised_loss([p, p], y)) == pytest.approx(2 * 71 / 126, abs=1e-9)
    p3, y3 = p.unsqueeze(-1), y.unsqueeze(-1)
    assert float(mcnet_supervised_loss([p3, p3, p3], y3)) == pytest.approx(0.5 * 3 / 3, abs=1e-8)


def test_mcnet_weight_schedule():
    # 3D: 1.0 * sigmoid_rampup(iter // 150, 40) over 15000 iterations.
    assert mcnet_consistency_weight(6000, 15000, 3) == 1.0  # 6000 // 150 = 40: full weight
    # 5999 // 150 = 39: exp(-5 (1 - 39/40)^2) = exp(-0.003125) = 0.99687988
    assert mcnet_consistency_weight(5999, 15000, 3) == pytest.approx(0.9968798777, abs=1e-9)
    assert mcnet_consistency_weight(1, 15000, 3) == pytest.approx(math.exp(-5), abs=1e-12)
    # Scaled to a shorter run: 40 % of it (400 of 1000).
    assert mcnet_consistency_weight(400, 1000, 3) == 1.0
    assert mcnet_consistency_weight(399, 1000, 3) < 1.0
    # 2D: 0.1 * sigmoid_rampup(iter // 150, 200) over 30000: 0.1 at the end; halfway
    # 0.1 * exp(-5 * 0.5^2) = 0.1 * exp(-1.25) = 0.02865048.
    assert mcnet_consistency_weight(30000, 30000, 2) == pytest.approx(0.1, abs=1e-15)
    assert mcnet_consistency_weight(15000, 30000, 2) == pytest.approx(0.0286504797, abs=1e-9)


def test_mcnet_step_uses_reference_weight():
    net = _net("mcnet", 2)
    method = Method("mcnet", TrainStep(net), LossConfig())
    x = torch.randn(4, 1, 32, 32)
    _, logs = method.step(x[:2], torch.randint(0, 3, (2, 32, 32)), x[2:], 99, 200)
    # Iteration 99 (0-based) is the reference's iter_num 100: 100 // 1 = 100 of 200 epochs.
    assert logs["lambda1"] == pytest.approx(0.0286504797, abs=1e-9)


# -- MC-Net+: three decoders differing only in up-sampling -------------------------------------


def _up_oracle(mode: str, up: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The up-sampling written out with functional ops, from the module's own weights."""
    d = x.dim() - 2
    if mode == "transpose":
        tconv = F.conv_transpose2d if d == 2 else F.conv_transpose3d
        return tconv(x, up.weight, up.bias, stride=2)
    conv = F.conv2d if d == 2 else F.conv3d
    z = conv(x, up[0].weight, up[0].bias)
    if mode == "nearest":
        return F.interpolate(z, scale_factor=2, mode="nearest")
    linear = "bilinear" if d == 2 else "trilinear"
    return F.interpolate(z, scale_factor=2, mode=linear, align_corners=True)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mcnet_decoders_differ_only_in_upsampling(spatial_dims):
    net = _net("mcnet", spatial_dims)
    modes = [net.cfg.seg_up_mode, *net.cfg.aux_decoders]
    assert sorted(modes) == ["linear-aligned", "nearest", "transpose"]
    # G1 is the decoder the reference evaluates: decoder1, bilinear in 2D, transposed in 3D.
    assert modes[0] == ("linear-aligned" if spatial_dims == 2 else "transpose")
    decoders: list[Decoder] = [net.seg_decoder, *net.aux_decoders]

    def body(dec: Decoder) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in dec.state_dict().items() if ".up." not in k}

    assert body(decoders[0]) == body(decoders[1]) == body(decoders[2])
    torch.manual_seed(0)
    for dec, mode in zip(decoders, modes, strict=True):
        for block in dec.ups:
            c_in = next(p for p in block.up.parameters()).shape[0 if mode == "transpose" else 1]
            x = torch.randn(2, c_in, *([3] * spatial_dims))
            torch.testing.assert_close(block.up(x), _up_oracle(mode, block.up, x))
    # Same body weights in all three: they differ exactly where the up-sampling differs.
    for dec in decoders[1:]:
        dec.load_state_dict({**dec.state_dict(), **{k: v for k, v in
                             decoders[0].state_dict().items() if ".up." not in k}})
    net.eval()
    feats = net.encoder(torch.randn(1, 1, *([32] * spatial_dims)))
    outs = [dec(feats)[-1] for dec in decoders]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_mcnet_3d_head_dropout_only_in_training():
    net = _net("mcnet", 3, encoder_dropout=(0.0,) * 5)
    assert net.cfg.head_dropout == 0.5
    x = torch.randn(2, 1, 32, 32, 32)
    net.train()
    a, b = net.forward_train(x), net.forward_train(x)
    assert not torch.allclose(a.logits, b.logits)  # Dropout3d(0.5) before every classifier
    net.eval()
    with torch.no_grad():
        out = net.forward_train(x)
        torch.testing.assert_close(out.logits, net(x))


def test_legacy_mcnet_checkpoint_loads():
    net = _net("mcnet-legacy", 2)
    old_cfg = {**net.cfg.to_dict(), "aux_decoder": True}
    del old_cfg["aux_decoders"]
    cfg = NetConfig.from_dict(old_cfg)
    assert cfg.aux_decoders == ("linear",)
    rename = {"aux_decoders.0.": "aux_decoder.", "aux_classifiers.0.": "aux_classifier."}
    old_state = {}
    for k, v in net.state_dict().items():
        for new, old in rename.items():
            k = k.replace(new, old)
        old_state[k] = v
    again = SFPCNet(cfg)
    again.load_state_dict(old_state)  # strict
    torch.testing.assert_close(again.aux_classifiers[0].weight, net.aux_classifiers[0].weight)


# -- URPC: the decoder perturbations are train-only --------------------------------------------


def test_urpc_perturbation_modules_by_hand():
    # Feature dropout: channel-mean attention (1, 2, 10), max 10, threshold 10 * u with
    # u in [0.7, 0.9], so 7 <= threshold <= 9: positions with attention 1 and 2 are kept, the
    # one with 10 is zeroed, whatever u is drawn.
    x = torch.tensor([[[[1.0, 2.0, 10.0]], [[1.0, 2.0, 10.0]]]])  # (1, 2, 1, 3)
    fd = URPCFeatureDropout().train()
    torch.testing.assert_close(fd(x), torch.tensor([[[[1.0, 2.0, 0.0]], [[1.0, 2.0, 0.0]]]]))
    # Feature noise: x + x * n, n ~ U(-0.3, 0.3) of shape (C, H, W), one draw for the batch.
    fn = URPCFeatureNoise().train()
    xb = torch.rand(1, 3, 4, 4).add(0.5).expand(2, 3, 4, 4)
    y = fn(xb)
    ratio = y / xb - 1
    assert float(ratio.abs().max()) <= 0.3 + 1e-6 and float(ratio.abs().max()) > 0
    torch.testing.assert_close(y[0], y[1])  # shared across the batch
    # Dropout 0.5: every element either 0 or doubled.
    dp = URPCDropout(0.5).train()
    z = dp(torch.ones(1000))
    assert set(z.unique().tolist()) <= {0.0, 2.0} and 300 < int((z == 0).sum()) < 700
    for module in (fd, fn, dp):
        module.eval()
        torch.testing.assert_close(module(x), x)


def test_urpc_2d_reference_heads():
    net = _net("urpc", 2, encoder_dropout=(0.0,) * 5)
    assert net.cfg.pyramid_style == "reference"
    # Coarsest first: dropout 0.5 (1/8), feature dropout (1/4), feature noise (1/2); 3x3 heads.
    assert [type(m) for m in net.pyramid_perturbations] == [
        URPCDropout, URPCFeatureDropout, URPCFeatureNoise]
    assert all(h.kernel_size == (3, 3) for h in net.pyramid_heads)
    x = torch.randn(2, 1, 32, 32)
    net.train()
    a, b = net.forward_train(x), net.forward_train(x)
    torch.testing.assert_close(a.logits, b.logits)  # G1 itself is not perturbed in 2D
    for pa, pb in zip(a.pyramid, b.pyramid, strict=True):
        assert not torch.allclose(pa, pb)
    net.eval()
    with torch.no_grad():
        out = net.forward_train(x)
        stages = net.seg_decoder(net.encoder(x))[:-1]
        for head, stage, got in zip(net.pyramid_heads, stages, out.pyramid, strict=True):
            # Eval: no perturbation, nearest up-sampling (F.interpolate's default mode).
            torch.testing.assert_close(got, F.interpolate(head(stage), size=(32, 32)))


def test_urpc_3d_reference_stage_dropout():
    net = _net("urpc", 3, encoder_dropout=(0.0,) * 5)
    drops = list(net.seg_decoder.stage_dropout)
    assert [type(m) for m in drops] == [nn.Dropout3d] * 4
    assert [m.p for m in drops] == [0.5, 0.3, 0.2, 0.1]
    assert all(h.kernel_size == (1, 1, 1) for h in net.pyramid_heads)
    x = torch.randn(2, 1, 32, 32, 32)
    net.train()
    a, b = net.forward_train(x), net.forward_train(x)
    assert not torch.allclose(a.logits, b.logits)  # on the decoder path: G1 is perturbed too
    net.eval()
    with torch.no_grad():
        out, again = net.forward_train(x), net.forward_train(x)
        torch.testing.assert_close(out.logits, net(x))
        for p, q in zip(out.pyramid, again.pyramid, strict=True):
            torch.testing.assert_close(p, q)


def test_urpc_legacy_is_unperturbed():
    net = _net("urpc-legacy", 2, encoder_dropout=(0.0,) * 5)
    assert all(isinstance(m, nn.Identity) for m in net.pyramid_perturbations)
    assert all(h.kernel_size == (1, 1) for h in net.pyramid_heads)


# -- UAMT: the threshold ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4])
def test_uamt_threshold_schedule(k):
    # sigmoid_rampup(t, T) = exp(-5 (1 - t/T)^2): exp(-5) = 0.006737947 at t = 0,
    # exp(-1.25) = 0.286504797 at T/2, 1 at T.
    # t = 0:   (0.75 + 0.25 * 0.006737947) * ln 2 = 0.751684487 * 0.693147181 = 0.521027983
    # t = T/2: (0.75 + 0.25 * 0.286504797) * ln 2 = 0.821626199 * 0.693147181 = 0.569507883
    # t = T:   ln 2 = 0.693147181
    # The same for K = 2 and K = 4 (the reference uses ln 2 whatever K); the "uamt-lnk" variant
    # multiplies by ln K instead: for K = 4 twice these (ln 4 = 2 ln 2).
    expected = [0.5210279826612536, 0.5695078834600942, 0.6931471805599453]
    got = [uamt_threshold(t, 1000, k) for t in (0, 500, 1000)]
    assert got == pytest.approx(expected, abs=1e-12)
    scale = math.log(k) / math.log(2)
    got_lnk = [uamt_threshold(t, 1000, k, log_k=True) for t in (0, 500, 1000)]
    assert got_lnk == pytest.approx([v * scale for v in expected], abs=1e-12)


# -- export: the served graph is E + G1 --------------------------------------------------------


@pytest.mark.parametrize(("method", "spatial_dims"), [("mcnet", 2), ("mcnet", 3), ("urpc", 2),
                                                      ("urpc", 3)])
def test_baselines_export_main_decoder_only(method, spatial_dims, tmp_path):
    import onnx

    torch.manual_seed(spatial_dims)
    net = _net(method, spatial_dims)
    lc = LossConfig()
    step = Method(method, TrainStep(net), lc)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    shape = [32] * spatial_dims
    for t in range(2):  # BatchNorm statistics off their init
        x = torch.randn(4, 1, *shape)
        loss, _ = step.step(x[:2], torch.randint(0, 3, (2, *shape)), x[2:], t, 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    meta = ModelMetadata(spatial_dims=spatial_dims, num_classes=3, patch_size=shape,
                         class_names=["bg", "a", "b"])
    export_model(net, meta, tmp_path)
    batch = np.random.default_rng(0).standard_normal((2, 1, *shape)).astype(np.float32)
    diffs = parity(net, tmp_path, batch)
    assert max(diffs.values()) < 1e-4, diffs
    ops = [n.op_type for n in onnx.load(str(tmp_path / "seg.onnx")).graph.node]
    # Only G1's up-sampling is in the graph: 4 stages of it, none of the other decoders'.
    if method == "mcnet" and spatial_dims == 2:
        assert ops.count("ConvTranspose") == 0 and ops.count("Resize") == 4
    else:
        assert ops.count("ConvTranspose") == 4 and ops.count("Resize") == 0
    assert "Dropout" not in ops and "RandomUniformLike" not in ops


@pytest.mark.parametrize("method", ["urpc", "uamt", "mcnet", "urpc-legacy", "uamt-lnk",
                                    "mcnet-legacy"])
def test_every_baseline_trains_all_its_heads(method):
    torch.manual_seed(0)
    net = _net(method, 2)
    lc = LossConfig(uamt_t=2)
    step = Method(method, TrainStep(net), lc)
    if step.uses_teacher:
        step.init_teacher(net)
    x = torch.randn(4, 1, 32, 32)
    loss, logs = step.step(x[:2], torch.randint(0, 3, (2, 32, 32)), x[2:], 5, 10)
    assert all(math.isfinite(v) for v in logs.values())
    loss.backward()
    # Every head the method adds gets a gradient (the reconstruction decoder and FLPM belong to
    # the SFPC variants only; baselines are built without them).
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert unused == [], unused
