"""RT-DETR model: official PyTorch reproduction (../shared/reference/rtdetr_r18vd), bridge, invariants.

Golden checks follow the folder's README: stage by stage (backbone from `input`, encoder from the saved
`backbone*`, decoder from the saved `encoder*`), pre-top-k tensors elementwise, query-indexed tensors after
aligning queries by their memory index, tolerance |flax - golden| <= 3e-4 * max|golden|. A train-mode
end-to-end check with denoising queries uses the model outputs stored in golden_loss.npz.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REFERENCE
from research.bridge.torch_bridge import BridgeError
from research.rtdetr import bridge
from research.rtdetr.decoder import deformable_attention_core, generate_anchors
from research.rtdetr.model import build_model, count_params, trainable_mask

FOLDER = os.path.join(REFERENCE, "rtdetr_r18vd")
TOL = 3e-4  # README: |flax - golden| <= 3e-4 * max|golden| for network outputs


def _nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def _part(variables, name):
    return {c: v[name] for c, v in variables.items() if name in v}


def _check(name, ours, ref, rel=TOL):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err, tol = np.abs(ours - ref).max(), rel * np.abs(ref).max()
    assert err <= tol, f"{name}: max|err| {err:.3g} > {tol:.3g}"
    return err


@pytest.fixture(scope="module")
def golden():
    if not os.path.isdir(FOLDER):
        pytest.skip(f"golden data not found at {FOLDER}")
    sys.path.insert(0, REFERENCE)
    from make_weights import make_weights
    manifest = json.load(open(os.path.join(FOLDER, "manifest.json")))
    g = dict(np.load(os.path.join(FOLDER, "golden.npz")))
    return manifest, g, make_weights(manifest, golden=g)


@pytest.fixture(scope="module")
def r18(golden):
    """The official r18vd with eval_spatial_size 320 (as the golden), weights through the bridge."""
    _, g, sd = golden
    model = build_model("r18vd", eval_spatial_size=(320, 320))
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 320, 320, 3))))
    return model, template, bridge.from_torch(model, sd, template)


def test_param_count_state_dict_keys_and_round_trip(golden, r18):
    manifest, _, sd = golden
    model, template, variables = r18
    assert count_params(template["params"]) == manifest["param_count"] == OFFICIAL_COUNTS["r18vd"][0]
    ours = bridge.to_torch(model, variables)
    official = {e["key"]: tuple(e["shape"]) for e in manifest["entries"]}
    assert set(ours) == set(official)
    assert {k: tuple(v.shape) for k, v in ours.items()} == official
    for k, v in sd.items():  # torch -> flax -> torch is the identity
        np.testing.assert_array_equal(ours[k], v, err_msg=k)


def test_bridge_is_strict(golden, r18):
    _, _, sd = golden
    model, template, _ = r18
    key = "decoder.decoder.layers.0.self_attn.in_proj_weight"
    for broken, what in (({k: v for k, v in sd.items() if k != key}, "missing"),
                         ({**sd, "decoder.extra.weight": np.zeros(3, np.float32)}, "unexpected"),
                         ({**sd, key: sd[key][:, :8]}, "mismatch")):
        with pytest.raises(BridgeError, match=what):
            bridge.from_torch(model, broken, template)


# Measured with the official code at the reference commit (configs/rtdetr/rtdetr_<variant>_6x_coco.yml, 80
# classes, pretrained off): sum(p.numel() for p in model.parameters()) and len(model.state_dict()).
OFFICIAL_COUNTS = {"r18vd": (20_184_464, 533), "r34vd": (31_441_668, 659), "r50vd": (42_891_372, 736),
                   "r50vd_m": (36_593_772, 760), "r101vd": (76_556_268, 991)}


@pytest.mark.parametrize("variant", ["r50vd", "r34vd", "r50vd_m", "r101vd"])
def test_official_variant_param_and_key_counts(variant):
    """Parameter and state_dict key counts equal the official model's. R50/R101 backbones use FrozenBatchNorm2d
    (buffers, not counted; exported as weight/bias/running_* without num_batches_tracked)."""
    model = build_model(variant, eval_spatial_size=None)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 320, 320, 3))))
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    sd = bridge.to_torch(model, zeros)
    assert (count_params(shapes["params"]), len(sd)) == OFFICIAL_COUNTS[variant]
    if variant != "r34vd":
        assert "backbone.conv1.conv1_1.norm.weight" in sd and "backbone.conv1.conv1_1.norm.running_var" in sd
        assert not any(k.startswith("backbone.") and k.endswith("num_batches_tracked") for k in sd)
        assert "encoder.input_proj.0.1.num_batches_tracked" in sd
        assert sd["backbone.res_layers.3.blocks.2.branch2c.conv.weight"].shape == (2048, 512, 1, 1)


def test_backbone_matches_golden(golden, r18):
    _, g, _ = golden
    model, _, variables = r18
    feats = jax.jit(lambda v, x: model.backbone().apply(v, x))(_part(variables, "backbone"), _nhwc(g["input"]))
    for i in range(3):
        _check(f"backbone{i}", _nchw(feats[i]), g[f"backbone{i}"])


def test_encoder_matches_golden(golden, r18):
    _, g, _ = golden
    model, _, variables = r18
    feats = [_nhwc(g[f"backbone{i}"]) for i in range(3)]
    outs = jax.jit(lambda v, f: model.encoder().apply(v, f))(_part(variables, "encoder"), feats)
    for i in range(3):
        _check(f"encoder{i}", _nchw(outs[i]), g[f"encoder{i}"])


def test_decoder_matches_golden(golden, r18):
    _, g, _ = golden
    model, _, variables = r18
    feats = [_nhwc(g[f"encoder{i}"]) for i in range(3)]
    out, state = jax.jit(lambda v, f: model.decoder().apply(v, f, mutable=["intermediates"]))(
        _part(variables, "decoder"), feats)
    inter = {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
    # pre-top-k, elementwise
    for name in ("decoder_memory", "enc_logits", "enc_anchors"):
        _check(name, inter[name], g[name])
    np.testing.assert_array_equal(inter["enc_valid_mask"].astype(np.float32), g["enc_valid_mask"])
    ref = g["enc_coord_unact"]
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(inter["enc_coord_unact"]), finite)  # +inf where not valid
    _check("enc_coord_unact", inter["enc_coord_unact"][finite], ref[finite])
    # query-indexed: recover the official top-k memory indices from the saved rows, align ours by index
    official_idx = np.array([np.argmin(np.abs(g["enc_logits"][0] - row).max(-1)) for row in g["enc_topk_logits"][0]])
    ours_idx = inter["enc_topk_ind"][0]
    assert set(official_idx) == set(ours_idx)
    perm = np.array([list(ours_idx).index(q) for q in official_idx])
    enc = out["enc_outputs"]
    pairs = (("enc_topk_logits", enc["pred_logits"]), ("enc_topk_bboxes", enc["pred_boxes"]),
             ("dec_init_ref_unact", inter["dec_init_ref_unact"]), ("pred_logits", out["pred_logits"]),
             ("pred_boxes", out["pred_boxes"]), ("dec_logits", out["pred_logits"]), ("dec_bboxes", out["pred_boxes"]))
    for name, ours in pairs:
        _check(name, np.asarray(ours)[:, perm], g[name].reshape(np.shape(ours)))
    assert set(out) == {"pred_logits", "pred_boxes", "enc_outputs"}  # eval: no aux / dn outputs


def official_dn_attn_mask(max_gt: int, num_group: int, num_queries: int) -> np.ndarray:
    """The official contrastive-denoising attention mask (True = blocked), written from its description:
    matching queries do not see denoising queries; each group of 2*max_gt denoising queries sees only itself
    and the matching queries."""
    nd = 2 * max_gt * num_group
    mask = np.zeros((nd + num_queries,) * 2, bool)
    mask[nd:, :nd] = True
    for i in range(num_group):
        a, b = 2 * max_gt * i, 2 * max_gt * (i + 1)
        mask[a:b, :a] = True
        mask[a:b, b:nd] = True
    return mask


def _closest_rows_err(ours, ref):
    """max over ref rows of the smallest max|diff| to any of our rows (query order may differ)."""
    return max(np.abs(o[:, None] - r[None]).max(-1).min(0).max() for o, r in zip(np.asarray(ours), ref))


def test_train_mode_with_denoising_matches_golden(golden):
    """Whole model in train mode (batch statistics, anchors from the map shapes, all layers, denoising queries)
    against the outputs the official model gave for golden_loss.npz (README 'Loss golden': same weights but the
    class-head biases set to -log(99), 2 images, the saved noised dn queries). End to end, so the tolerance is the
    end-to-end float32 noise (README column (b), ~5.6e-4 of max on the logits) with margin: 1e-3 of max."""
    path = os.path.join(FOLDER, "golden_loss.npz")
    if not os.path.exists(path):
        pytest.skip("golden_loss.npz not found")
    manifest, g, sd = golden
    gl = dict(np.load(path))
    sd = dict(sd)
    for k in sd:
        if k == "decoder.enc_score_head.bias" or (k.startswith("decoder.dec_score_head.") and k.endswith(".bias")):
            sd[k] = np.full_like(sd[k], -np.log(99.0))
    model = build_model("r18vd", eval_spatial_size=(320, 320))
    x = np.random.default_rng(1234).uniform(0, 1, (2, 3, 320, 320)).astype(np.float32)
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 320, 320, 3))))
    variables = bridge.from_torch(model, sd, template)
    mask = official_dn_attn_mask(3, int(gl["dn_meta/dn_num_group"]), 300)
    assert mask.shape[0] == 198 + 300
    out, _ = jax.jit(lambda v, x, c, b, m: model.apply(v, x, train=True, dn_class=c, dn_bbox_unact=b, dn_attn_mask=m,
                                                       mutable=["batch_stats"]))(
        variables, _nhwc(x), jnp.asarray(gl["dn_input/class"], jnp.int32), jnp.asarray(gl["dn_input/bbox_unact"]),
        jnp.asarray(mask))
    rel = 1e-3
    official_aux = out["aux_outputs"] + [out["enc_outputs"]]  # the official order: decoder layers, then encoder
    pairs = [("outputs", out)] + [(f"outputs/aux_outputs/{i}", a) for i, a in enumerate(official_aux)]
    for prefix, o in pairs:
        for f in ("pred_logits", "pred_boxes"):
            ref = gl[f"{prefix}/{f}"]
            err = _closest_rows_err(o[f], ref)
            assert err <= rel * np.abs(ref).max(), (prefix, f, err)
    assert len(out["dn_outputs"]) == 3
    for i, o in enumerate(out["dn_outputs"]):  # denoising queries keep their positions
        for f in ("pred_logits", "pred_boxes"):
            _check(f"dn {i} {f}", o[f], gl[f"outputs/dn_aux_outputs/{i}/{f}"], rel=rel)


def test_deformable_sampling_equals_torch_grid_sample():
    """The gather-based sampler against F.grid_sample(bilinear, zeros, align_corners=False), points inside,
    on the border and outside the maps, non-square levels."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    shapes = ((5, 7), (3, 4), (2, 2))
    b, q, nh, hd, p = 2, 6, 3, 4, 5
    value = rng.standard_normal((b, sum(h * w for h, w in shapes), nh, hd)).astype(np.float32)
    loc = rng.uniform(-0.3, 1.3, (b, q, nh, len(shapes), p, 2)).astype(np.float32)
    loc[0, 0, 0, 0, :2] = [[0.0, 0.0], [1.0, 1.0]]  # exact corners of the map
    attn = rng.uniform(0, 1, (b, q, nh, len(shapes), p)).astype(np.float32)
    ours = np.asarray(deformable_attention_core(jnp.asarray(value), shapes, jnp.asarray(loc), jnp.asarray(attn)))
    # reference: per level and head, grid_sample the [C, H, W] map at 2*loc-1, weight by attention, sum
    ref = np.zeros((b, q, nh, hd), np.float32)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = torch.from_numpy(value[:, start:start + h * w]).reshape(b, h, w, nh, hd).permute(0, 3, 4, 1, 2)
        v = v.reshape(b * nh, hd, h, w)
        grid = torch.from_numpy(2 * loc[:, :, :, lvl] - 1).permute(0, 2, 1, 3, 4).reshape(b * nh, q, p, 2)
        s = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # [b*nh, hd, q, p]
        a = torch.from_numpy(attn[:, :, :, lvl]).permute(0, 2, 1, 3).reshape(b * nh, 1, q, p)
        ref += (s * a).sum(-1).reshape(b, nh, hd, q).permute(0, 3, 1, 2).numpy()
        start += h * w
    np.testing.assert_allclose(ours, ref.reshape(b, q, nh * hd), rtol=1e-5, atol=1e-5)


def test_anchors_train_equal_eval_and_eval_size_is_enforced(golden):
    _, g, _ = golden
    anchors, valid = generate_anchors([(40, 40), (20, 20), (10, 10)])
    np.testing.assert_allclose(anchors, g["enc_anchors"], rtol=1e-6)  # inf == inf
    np.testing.assert_array_equal(valid.astype(np.float32), g["enc_valid_mask"])
    # eval mode uses the anchors / position embedding of eval_spatial_size: another input size is an error
    # (as in the official code); train mode computes them from the maps
    model = build_model("tiny", eval_spatial_size=(64, 64))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    with pytest.raises(ValueError, match="eval_spatial_size"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 96, 96, 3))), variables)
    out, _ = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 96, 96, 3)), True, mutable=["batch_stats"]),
                            variables)
    assert out["pred_boxes"].shape == (1, 20, 4)


def _random_variables(model, x, seed=0):
    """Variables of `model` drawn in numpy from its abstract init (no init compile): weights normal/sqrt(fan_in),
    norm scales and variances uniform(0.5, 1.5), other vectors normal*0.05, like the golden's make_weights."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        if name in ("kernel", "embedding"):
            fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else 4
            return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)
        return jnp.asarray(rng.standard_normal(leaf.shape) * 0.05, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    """The tiny variant in train mode with frozen stem + first stage and frozen norms (R50-style freezing)."""
    model = build_model("tiny", num_classes=5, eval_spatial_size=(64, 64), backbone=dict(freeze_at=1, freeze_norm=True))
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3))
    variables = _random_variables(model, x)

    def loss(params, v, x, cls, box, mask):
        out, new_state = model.apply({**v, "params": params}, x, True, cls, box, mask, mutable=["batch_stats"])
        terms = [out["pred_logits"].sum(), out["pred_boxes"].sum(), out["enc_outputs"]["pred_boxes"].sum()]
        terms += [o["pred_logits"].sum() + o["pred_boxes"].sum() for o in out["dn_outputs"] + out["aux_outputs"]]
        return sum(terms), (out, new_state)

    # one compiled train step (outputs and gradients) serves every tiny test
    step = jax.jit(jax.grad(loss, has_aux=True))
    return model, variables, x, step


def _tiny_dn(rng, num_classes=5, max_gt=2, groups=3, num_queries=20, b=2):
    n = 2 * max_gt * groups
    cls = rng.integers(0, num_classes + 1, (b, n)).astype(np.int32)
    box = rng.normal(0, 1.5, (b, n, 4)).astype(np.float32)
    return jnp.asarray(cls), jnp.asarray(box), jnp.asarray(official_dn_attn_mask(max_gt, groups, num_queries))


def test_denoising_queries_are_isolated_by_the_mask(tiny):
    """With the official mask, the matching queries' outputs do not depend on the denoising queries, and one
    denoising group's outputs do not depend on another group's inputs."""
    model, variables, x, step = tiny
    cls, box, mask = _tiny_dn(np.random.default_rng(0))
    cls2, box2, _ = _tiny_dn(np.random.default_rng(1))
    _, (out, _) = step(variables["params"], variables, x, cls, box, mask)
    _, (other, _) = step(variables["params"], variables, x, cls2, box2, mask)
    for f in ("pred_logits", "pred_boxes"):
        np.testing.assert_allclose(other[f], out[f], atol=2e-5)
        for i in range(len(out["aux_outputs"])):
            np.testing.assert_allclose(other["aux_outputs"][i][f], out["aux_outputs"][i][f], atol=2e-5)
        assert np.abs(np.asarray(other["dn_outputs"][-1][f] - out["dn_outputs"][-1][f])).max() > 1e-2
    # change group 1 only (queries 4..7): groups 0 and 2 unchanged, group 1 changed
    _, (moved, _) = step(variables["params"], variables, x, cls, box.at[:, 4:8].add(1.0), mask)
    moved, ref = moved["dn_outputs"][-1]["pred_boxes"], out["dn_outputs"][-1]["pred_boxes"]
    np.testing.assert_allclose(moved[:, :4], ref[:, :4], atol=2e-5)
    np.testing.assert_allclose(moved[:, 8:], ref[:, 8:], atol=2e-5)
    assert np.abs(np.asarray(moved[:, 4:8] - ref[:, 4:8])).max() > 1e-2
    with pytest.raises(ValueError, match="training-mode"):
        jax.eval_shape(lambda v: model.apply(v, x, False, cls, box, mask), variables)


def test_gradients_frozen_stages_and_padding_row(tiny):
    """A train step's gradients: finite, zero for the frozen backbone stem/stage (and so masked by
    trainable_mask), zero for the denoising padding row (nn.Embedding padding_idx); frozen norms unchanged."""
    model, variables, x, step = tiny
    cls, box, mask = _tiny_dn(np.random.default_rng(2))
    assert (np.asarray(cls) == 5).any()
    grads, (_, new_state) = step(variables["params"], variables, x, cls, box, mask)
    assert all(np.isfinite(np.asarray(gr)).all() for gr in jax.tree_util.tree_leaves(grads))
    mask_tree = trainable_mask(model, variables["params"])
    frozen = [p for p, t in jax.tree_util.tree_leaves_with_path(mask_tree) if not t]
    assert frozen and all(p[0].key == "backbone" and p[1].key in ("conv1", "res_layers.0") for p in frozen)
    for (path, gr), (_, trainable) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                          jax.tree_util.tree_leaves_with_path(mask_tree)):
        if not trainable:
            assert not np.asarray(gr).any(), path
    short = grads["backbone"]["res_layers.1"]["blocks.0"]["short"]["conv"]["conv"]["kernel"]
    assert np.abs(np.asarray(short)).max() > 0
    emb_grad = np.asarray(grads["decoder"]["denoising_class_embed"]["embedding"])
    assert not emb_grad[5].any() and emb_grad[:5].any()
    assert "scale" in variables["batch_stats"]["backbone"]["conv1"]["conv1_1"]["norm"]  # FrozenBatchNorm
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_state["batch_stats"]["backbone"],
                           variables["batch_stats"]["backbone"])
    assert not np.array_equal(new_state["batch_stats"]["encoder"]["input_proj.0"]["1"]["mean"],
                              variables["batch_stats"]["encoder"]["input_proj.0"]["1"]["mean"])


def test_bfloat16_decoder_stage(golden, r18):
    """The compute dtype is honoured (bfloat16 activations) and stays close to the float32 golden."""
    _, g, _ = golden
    model, _, variables = r18
    dec = build_model("r18vd", eval_spatial_size=(320, 320), dtype=jnp.bfloat16).decoder()
    feats = [_nhwc(g[f"encoder{i}"]) for i in range(3)]
    out, state = jax.jit(lambda v, f: dec.apply(v, f, mutable=["intermediates"]))(_part(variables, "decoder"), feats)
    inter = state["intermediates"]
    assert out["pred_logits"].dtype == jnp.bfloat16 and inter["decoder_memory"][0].dtype == jnp.bfloat16
    _check("bf16 enc_logits", inter["enc_logits"][0], g["enc_logits"], rel=0.02)  # measured 6e-3


def test_avg_pool_ceil_mode_equals_torch():
    torch = pytest.importorskip("torch")
    from research.rtdetr.backbone import avg_pool_2x2_ceil
    x = np.random.default_rng(0).standard_normal((2, 7, 6, 3)).astype(np.float32)
    ref = torch.nn.AvgPool2d(2, 2, 0, ceil_mode=True)(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(_nchw(avg_pool_2x2_ceil(jnp.asarray(x))), ref, rtol=1e-6, atol=1e-6)


def test_cpu_speed_layer_same_parameters_and_values():
    """The task's model with `config.model.conv_impl` "auto" (on CPU: research/cpu/layers.py convolutions and
    memory-lean BatchNorm) has flax's parameter tree and gives the same eval outputs, train-mode outputs,
    BatchNorm statistics and gradients as flax's layers ("lax", what the goldens and ONNX export use)."""
    from configs.rtdetr import get_config
    from research.cpu.layers import PLAIN, select
    from research.rtdetr.task import model_from_config
    if select("auto") == PLAIN:
        pytest.skip("no CPU speed layer on this backend")
    c = get_config("smoke")
    fast, plain = model_from_config(c, 5, conv_impl="auto"), model_from_config(c, 5, conv_impl="lax")
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3))
    variables = _random_variables(plain, x)
    assert jax.tree_util.tree_structure(jax.eval_shape(lambda: fast.init(jax.random.PRNGKey(0), x))) == \
        jax.tree_util.tree_structure(jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), x)))
    cls, box, mask = _tiny_dn(np.random.default_rng(0), num_queries=20)

    def run(model):
        def loss(params):
            out, new = model.apply({**variables, "params": params}, x, True, cls, box, mask, mutable=["batch_stats"])
            return out["pred_logits"].sum() + 10 * out["pred_boxes"].sum() + out["dn_outputs"][-1]["pred_boxes"].sum(), (
                out, new)
        (value, (out, new)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        return value, out, new, grads, jax.jit(lambda v: model.apply(v, x, False))(variables)

    ref, got = run(plain), run(fast)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4)
    for name, a, b in (("train outputs", got[1], ref[1]), ("batch_stats", got[2], ref[2]), ("eval", got[4], ref[4])):
        for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-3, atol=1e-4, err_msg=f"{name} {path}")
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(got[3]), jax.tree_util.tree_leaves(ref[3])):
        scale = max(float(np.abs(np.asarray(v)).max()), 1e-6)
        assert float(np.abs(np.asarray(u) - np.asarray(v)).max()) <= 1e-3 * scale + 1e-5, path


@pytest.mark.parametrize("conv_impl", ["lax", "auto"])
def test_repvgg_deploy_form_equals_two_branches(conv_impl):
    """RepVggBlock in inference runs the official deploy form (one 3x3 conv with the folded 1x1 branch and both
    BatchNorms, `get_equivalent_kernel_bias`): same output as the two-branch form with random running statistics,
    one convolution instead of two, and the training path untouched."""
    from research.cpu.layers import select
    from research.rtdetr.backbone import BN_EPS, BN_MOMENTUM
    from research.rtdetr.encoder import RepVggBlock
    import functools
    layers = select(conv_impl)
    norm = functools.partial(layers.nn_batch_norm, momentum=BN_MOMENTUM, epsilon=BN_EPS, use_fast_variance=False)
    kw = dict(act="silu", conv=layers.nn_conv, norm=norm)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 10, 16))
    block, plain = RepVggBlock(24, **kw), RepVggBlock(24, deploy=False, **kw)
    variables = _random_variables(plain, x)
    fused = jax.jit(lambda v, x: block.apply(v, x))(variables, x)
    ref = jax.jit(lambda v, x: plain.apply(v, x))(variables, x)
    assert float(jnp.abs(fused - ref).max()) <= 1e-5 * float(jnp.abs(ref).max())
    assert float(jnp.abs(ref).max()) > 0.1
    # the deploy kernel is what get_equivalent_kernel_bias gives: the 1x1 branch on the centre tap only
    k, b = block.apply(variables, method=lambda m: m.deploy_kernel_bias())
    p, s = variables["params"], variables["batch_stats"]
    a1 = p["conv2"]["norm"]["scale"] / np.sqrt(s["conv2"]["norm"]["var"] + BN_EPS)
    a3 = p["conv1"]["norm"]["scale"] / np.sqrt(s["conv1"]["norm"]["var"] + BN_EPS)
    np.testing.assert_allclose(k[0, 0], p["conv1"]["conv"]["kernel"][0, 0] * a3, rtol=1e-6)
    np.testing.assert_allclose(k[1, 1], p["conv1"]["conv"]["kernel"][1, 1] * a3 + p["conv2"]["conv"]["kernel"][0, 0] * a1,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, p["conv1"]["norm"]["bias"] - s["conv1"]["norm"]["mean"] * a3
                               + p["conv2"]["norm"]["bias"] - s["conv2"]["norm"]["mean"] * a1, rtol=1e-5, atol=1e-6)
    # one convolution in the deploy graph, two in the training form; training uses batch statistics as before
    if conv_impl == "lax":
        count = lambda m: str(jax.make_jaxpr(lambda v, x: m.apply(v, x))(variables, x)).count("conv_general_dilated")
        assert (count(block), count(plain)) == (1, 2)
    t1 = block.apply(variables, x, True, mutable=["batch_stats"])
    t2 = plain.apply(variables, x, True, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(t1[0]), np.asarray(t2[0]))
