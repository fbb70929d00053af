"""Graph diff (text snapshot, HTML, tlparse artefact) and kept-token maps (PNG)."""

from __future__ import annotations

import re
import struct
import sys

import expecttest
import numpy as np
import PIL.Image
import pytest
import torch

from libra_fx.runtime import compat
from harness import compile_and_run
from libra_fx.cli import main
from libra_fx.methods.compressors import COMPENSATION, PRUNED
from libra_fx.reports.diff import diff
from libra_fx.testing import synthetic_image, tiny_llava, tiny_llava_inputs
from libra_fx.reports.plot import fidelity_plot
from libra_fx.reports.token_map import TokenMap, _colour, render, token_map, write_png


def libra_record():
    model = tiny_llava(num_layers=3)
    _, be = compile_and_run(model, tiny_llava_inputs(model), method="libra", ratio=0.5, layers=(1,),
                            compiler="eager")
    return be.last


class TestDiffSnapshot(expecttest.TestCase):
    def test_text_diff_libra_one_layer(self):
        text = diff(libra_record()).text()
        head = text.split("## passes")[0].replace("→", "->")  # expecttest writes ASCII only
        self.assertExpectedInline(head, """\
# libra-fx graph diff

T0 = 31  (after layer 1)

## <outside layers>: 80 -> 81 ops (visual_span_mask 0->1)
  + visual_span_mask = visual_span_mask(special_image_mask_1)  [1, 48]
  # hidden_states_42: [1, 48, 64] -> [1, 31, 64]
  # pow_7: [1, 48, 64] -> [1, 31, 64]
  # variance_6: [1, 48, 1] -> [1, 31, 1]
  # add_24: [1, 48, 1] -> [1, 31, 1]
  # rsqrt_6: [1, 48, 1] -> [1, 31, 1]
  # hidden_states_43: [1, 48, 64] -> [1, 31, 64]
  # to_19: [1, 48, 64] -> [1, 31, 64]
  # hidden_states_44: [1, 48, 64] -> [1, 31, 64]
  # hidden_states_45: [1, 48, 64] -> [1, 31, 64]
  # logits: [1, 48, 128] -> [1, 31, 128]

## model.language_model.layers.1: 68 -> 74 ops (compress_visual_tokens 0->1, getitem 4->7, last_row_importance 0->1, sym_size 0->1)
  + last_row_importance = last_row_importance(q_embed_1, keys_5)  [1, 48]
  + compress_visual_tokens = compress_visual_tokens(hidden_states_33, last_row_importance, visual_span_mask)
  + getitem = getitem(compress_visual_tokens)  [1, 31, 64]
  + getitem_4 = getitem(compress_visual_tokens)  [1, 31]
  + getitem_5 = getitem(compress_visual_tokens)  [1, 31]
  + sym_size_int = sym_size(getitem)

## model.language_model.layers.2: 68 -> 70 ops (gather_tokens 0->2)
  + gather_tokens = gather_tokens(cos_5, getitem_5)  [1, 1, 31, 16]
  + gather_tokens_1 = gather_tokens(sin_5, getitem_5)  [1, 1, 31, 16]
  ~ hidden_states_34: .to(getitem)
  ~ view_12: .view(linear_28, sym_size_int)
  ~ view_13: .view(linear_29, sym_size_int)
  ~ view_14: .view(linear_30, sym_size_int)
  ~ mul_28: mul(query_states_2, gather_tokens)
  ~ mul_29: mul(cat_11, gather_tokens_1)
  ~ mul_30: mul(key_states_2, gather_tokens)
  ~ mul_31: mul(cat_12, gather_tokens_1)
  ~ attn_output_21: .reshape(attn_output_20, sym_size_int)
  ~ reshape_9: .reshape(attn_output_22, sym_size_int)
  ~ hidden_states_37: add(getitem, attn_output_24)
  # hidden_states_34: [1, 48, 64] -> [1, 31, 64]
  # pow_5: [1, 48, 64] -> [1, 31, 64]
  # variance_4: [1, 48, 1] -> [1, 31, 1]
  # add_18: [1, 48, 1] -> [1, 31, 1]
  # rsqrt_4: [1, 48, 1] -> [1, 31, 1]
  # hidden_states_35: [1, 48, 64] -> [1, 31, 64]
  # to_15: [1, 48, 64] -> [1, 31, 64]
  # hidden_states_36: [1, 48, 64] -> [1, 31, 64]
  # linear_28: [1, 48, 64] -> [1, 31, 64]
  # view_12: [1, 48, 4, 16] -> [1, 31, 4, 16]
  # query_states_2: [1, 4, 48, 16] -> [1, 4, 31, 16]
  # linear_29: [1, 48, 32] -> [1, 31, 32]
  # view_13: [1, 48, 2, 16] -> [1, 31, 2, 16]
  # key_states_2: [1, 2, 48, 16] -> [1, 2, 31, 16]
  # linear_30: [1, 48, 32] -> [1, 31, 32]
  # view_14: [1, 48, 2, 16] -> [1, 31, 2, 16]
  # value_states_2: [1, 2, 48, 16] -> [1, 2, 31, 16]
  # mul_28: [1, 4, 48, 16] -> [1, 4, 31, 16]
  # x1_4: [1, 4, 48, 8] -> [1, 4, 31, 8]
  # x2_4: [1, 4, 48, 8] -> [1, 4, 31, 8]
  # neg_4: [1, 4, 48, 8] -> [1, 4, 31, 8]
  # cat_11: [1, 4, 48, 16] -> [1, 4, 31, 16]
  # mul_29: [1, 4, 48, 16] -> [1, 4, 31, 16]
  # q_embed_2: [1, 4, 48, 16] -> [1, 4, 31, 16]
  # mul_30: [1, 2, 48, 16] -> [1, 2, 31, 16]
  # x1_5: [1, 2, 48, 8] -> [1, 2, 31, 8]
  # x2_5: [1, 2, 48, 8] -> [1, 2, 31, 8]
  # neg_5: [1, 2, 48, 8] -> [1, 2, 31, 8]
  # cat_12: [1, 2, 48, 16] -> [1, 2, 31, 16]
  # mul_31: [1, 2, 48, 16] -> [1, 2, 31, 16]
  # k_embed_2: [1, 2, 48, 16] -> [1, 2, 31, 16]
  # keys_6: [1, 2, 48, 16] -> [1, 2, 31, 16]
  # values_6: [1, 2, 48, 16] -> [1, 2, 31, 16]
  # attn_output_20: [1, 4, 48, 16] -> [1, 4, 31, 16]
  # attn_output_21: [1, 4, 48, 16] -> [1, 4, 31, 16]
  # transpose_20: [1, 48, 4, 16] -> [1, 31, 4, 16]
  # attn_output_22: [1, 48, 4, 16] -> [1, 31, 4, 16]
  # reshape_9: [1, 48, 64] -> [1, 31, 64]
  # attn_output_23: [1, 48, 64] -> [1, 31, 64]
  # attn_output_24: [1, 48, 64] -> [1, 31, 64]
  # hidden_states_37: [1, 48, 64] -> [1, 31, 64]
  # hidden_states_38: [1, 48, 64] -> [1, 31, 64]
  # pow_6: [1, 48, 64] -> [1, 31, 64]
  # variance_5: [1, 48, 1] -> [1, 31, 1]
  # add_22: [1, 48, 1] -> [1, 31, 1]
  # rsqrt_5: [1, 48, 1] -> [1, 31, 1]
  # hidden_states_39: [1, 48, 64] -> [1, 31, 64]
  # to_17: [1, 48, 64] -> [1, 31, 64]
  # hidden_states_40: [1, 48, 64] -> [1, 31, 64]
  # linear_32: [1, 48, 128] -> [1, 31, 128]
  # silu_2: [1, 48, 128] -> [1, 31, 128]
  # linear_33: [1, 48, 128] -> [1, 31, 128]
  # mul_34: [1, 48, 128] -> [1, 31, 128]
  # down_proj_2: [1, 48, 64] -> [1, 31, 64]
  # hidden_states_41: [1, 48, 64] -> [1, 31, 64]

""")


def test_html_is_self_contained():
    page = diff(libra_record()).html()
    assert page.startswith("<!DOCTYPE html>") and "compress_visual_tokens" in page
    assert "src=" not in page and "href=" not in page


def test_diff_is_emitted_for_tlparse(monkeypatch):
    artefacts = []
    monkeypatch.setattr(compat, "trace_structured",
                        lambda kind, metadata_fn, payload_fn: artefacts.append((kind, metadata_fn(), payload_fn())))
    libra_record()
    (kind, meta, payload), = artefacts
    assert kind == "artifact" and meta["name"] == "libra_fx_graph_diff"
    assert payload.startswith("# libra-fx graph diff") and "+ compress_visual_tokens" in payload


def test_diff_of_an_uncompressed_graph_says_why():
    model = tiny_llava()
    _, be = compile_and_run(model, tiny_llava_inputs(model, with_image=False), compiler="eager", layers=(1,))
    with pytest.raises(ValueError, match="not compressed: no visual tokens"):
        diff(be.last)


@pytest.fixture(scope="module")
def picture_inputs():
    model = tiny_llava()
    inputs = tiny_llava_inputs(model)
    inputs["pixel_values"] = synthetic_image(48)[None]
    return model, inputs


@pytest.mark.parametrize("method, kept", [("libra", [18, 9]), ("fastv", [18, 9]), ("turbo", [18, 9])])
def test_token_map_follows_the_stages(picture_inputs, method, kept):
    tmap = token_map(*picture_inputs, method=method, ratio=0.5, layers=(1, 2))
    assert tmap.grid == 6 and [int(t.sum()) for t in tmap.targets] == kept
    for label, target in zip(tmap.labels, tmap.targets):
        assert (label[target] >= 0).all()
    if method == "fastv":  # FastV keeps exactly its targets; everything else is pruned
        assert [int((lab == PRUNED).sum()) for lab in tmap.labels] == [18, 27]
    else:  # merging: every group holds its target
        for label, target in zip(tmap.labels, tmap.targets):
            assert set(label[label >= 0].tolist()) == set(label[target].tolist())


def test_png_has_the_panels_and_colours(picture_inputs, tmp_path):
    tmap = token_map(*picture_inputs, method="fastv", ratio=0.5, layers=(1, 2))
    picture = render(tmap, picture_inputs[1]["pixel_values"][0], scale=4)
    assert picture.mode == "RGB" and picture.size == (3 * 192 + 2 * 6, 192)
    rgb = torch.from_numpy(np.array(picture))
    assert (rgb[:, 192:198] == 255).all() and (rgb[:, 390:396] == 255).all()  # white gaps
    assert (rgb[::32, :192] == 255).all() and (rgb[:, :192:32] == 255).all()  # the patch grid
    cell = 32
    for p in range(36):
        y, x = (p // 6) * cell, 192 + 6 + (p % 6) * cell  # stage-1 panel
        tile = rgb[y:y + cell, x:x + cell].float()
        if tmap.labels[0][p] == PRUNED:
            assert tile.mean() < 30  # pruned patches are dark
        else:
            assert (tile[0, :] == 255).all()  # kept targets are framed in white
    path = tmp_path / "map.png"
    write_png(path, picture)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (3 * 192 + 12, 192)
    with PIL.Image.open(path) as back:
        assert back.size == picture.size and (np.asarray(back) == np.asarray(picture)).all()


def test_render_draws_each_fate():
    # 2×2 patches of an 8×8 image: a target (group 3), its group member, a compensation member, a pruned one
    tmap = TokenMap(2, [torch.tensor([3, 3, COMPENSATION, PRUNED])], [torch.tensor([True, False, False, False])])
    image = torch.linspace(-1, 1, 3 * 8 * 8).reshape(3, 8, 8)
    rgb = torch.from_numpy(np.array(render(tmap, image, scale=4))).float()
    assert rgb.shape == (32, 2 * 32 + 6, 3) and (rgb[:, 32:38] == 255).all()
    plain = (image - image.min()) / (image.max() - image.min()) * 255
    plain = plain.permute(1, 2, 0).repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert (rgb[1:16, 1:16] - plain[1:16, 1:16]).abs().max() <= 0.5  # panel 0: the image ...
    assert (rgb[::16, :32] == 255).all() and (rgb[:, :32:16] == 255).all()  # ... and its patch grid
    stage = rgb[:, 38:]
    tint = 0.45 * plain + 0.55 * torch.tensor(_colour(3), dtype=torch.float)
    assert (stage[:16, 16:] - tint[:16, 16:]).abs().max() < 2  # the member: tinted, no frame
    target = stage[:16, :16]
    assert (target[:2] == 255).all() and (target[:, -2:] == 255).all()  # the target: framed in white
    assert (target[2:-2, 2:-2] - tint[2:14, 2:14]).abs().max() < 2
    stripes = (torch.arange(16)[:, None] + torch.arange(16)) % 4 == 0
    hatched = stage[16:, :16]  # compensation: dark, with light diagonal stripes
    assert (hatched[stripes] == 200).all()
    assert (hatched[~stripes] - 0.25 * plain[16:, :16][~stripes]).abs().max() < 1
    assert (stage[16:, 16:] - 0.1 * plain[16:, 16:]).abs().max() < 1  # pruned: near-black


def test_fidelity_plot_draws_a_png(tmp_path):
    rows = [dict(method="uncompressed", schedule="-", layers="-", flops_ratio=1.0, accuracy=0.99)]
    rows += [dict(method=m, schedule=s, layers=layers, flops_ratio=f, accuracy=a)
             for m in ("libra", "fastv") for s, layers in (("1 stage", "(4,)"), ("2 stages", "(2, 5)"))
             for f, a in ((0.8, 0.98), (0.7, 0.95))]
    rows.append(dict(method="prumerge", schedule="vision side", layers="()", flops_ratio=0.2, accuracy=0.4))
    path = tmp_path / "fidelity.png"
    assert fidelity_plot(rows, path) == ["libra", "fastv", "prumerge"]
    with PIL.Image.open(path) as png:
        assert png.format == "PNG" and png.width > 600 and png.height > 300


@pytest.mark.parametrize("module, call, message", [
    ("PIL", lambda: render(token_map_stub(), torch.zeros(3, 8, 8)), "kept-token maps need Pillow"),
    ("matplotlib", lambda: fidelity_plot([], "unused.png"), "the fidelity plot needs matplotlib"),
])
def test_missing_viz_extra_names_it(monkeypatch, module, call, message):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] or [module]:
        monkeypatch.setitem(sys.modules, name, None)  # ``import module`` now raises ImportError
    with pytest.raises(ImportError, match=re.escape(message) + r".*pip install 'libra-fx\[viz\]'"):
        call()


def token_map_stub():
    return TokenMap(2, [], [])


def test_cli_show_and_diff(tmp_path, capsys):
    main(["show", "--method", "libra", "--layers", "1", "--out", str(tmp_path / "m.png")])
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    main(["diff", "--method", "fastv", "--layers", "1", "--out", str(tmp_path / "d.html")])
    assert (tmp_path / "d.html").read_text().startswith("<!DOCTYPE html>")
    main(["diff", "--method", "fastv", "--layers", "1"])
    assert "# libra-fx graph diff" in capsys.readouterr().out
