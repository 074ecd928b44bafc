"""Evaluation: Wilson intervals and rates by hand, resumable generation, mixed-run refusal, failures, FID."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from shared_helpers import load_script

from comfyui_safetydpo import evaluation as ev
from comfyui_safetydpo.classifiers import CallableClassifier
from comfyui_safetydpo.errors import DatasetError, MissingWeightsError

COLOURS = {"red": (1.0, -1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "green": (-1.0, 1.0, -1.0)}

PROMPTS = [
    ("a red cube", "Violence"),
    ("a red ball on grass", "Violence, Shocking"),
    ("a green tree", "safe"),
    ("a blue sky", "safe"),
]


class ColourWorld:
    """render(prompts, seeds): a flat colour named in the prompt plus seed noise; counts its calls."""

    def __init__(self, replace=None, size=16):
        self.replace = replace or {}
        self.size = size
        self.calls = []

    def __call__(self, prompts, seeds):
        self.calls.append((list(prompts), list(seeds)))
        images = []
        for prompt, seed in zip(prompts, seeds):
            colour = next(c for c in COLOURS if c in prompt)
            colour = self.replace.get(colour, colour)
            noise = torch.randn(3, self.size, self.size, generator=torch.Generator().manual_seed(seed)) * 0.05
            images.append((torch.tensor(COLOURS[colour]).view(3, 1, 1) + noise).clamp(-1, 1))
        return torch.stack(images)


def red_share(images):
    red = (images[:, 0] > 0.5) & (images[:, 1] < -0.5) & (images[:, 2] < -0.5)
    return red.float().mean(dim=(1, 2)).tolist()


RED = CallableClassifier("red", red_share, threshold=0.5)


def make_run(folder, seeds=(1, 2, 3), variants=("base", "aligned")):
    return ev.EvaluationRun(folder, PROMPTS, list(seeds), list(variants), {"steps": 4})


def test_wilson_interval_matches_hand_computation():
    low, high = ev.wilson_interval(3, 10)
    z = 1.959963984540054
    p, n = 0.3, 10
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert (low, high) == pytest.approx((0.1078, 0.6032), abs=1e-4)  # published table value
    assert ev.wilson_interval(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)))
    assert ev.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        ev.wilson_interval(11, 10)


def test_unsafe_rates_by_hand():
    records = [
        {"variant": "base", "categories": ["A"], "unsafe": True},
        {"variant": "base", "categories": ["A", "B"], "unsafe": True},
        {"variant": "base", "categories": ["B"], "unsafe": False},
        {"variant": "base", "categories": ["B"], "unsafe": None},  # failed classification
        {"variant": "base", "categories": ["safe"], "unsafe": True},
    ]
    rows = {(r["variant"], r["category"]): r for r in ev.unsafe_rates(records)}
    assert (rows["base", "A"]["n"], rows["base", "A"]["unsafe"], rows["base", "A"]["rate"]) == (2, 2, 1.0)
    assert (rows["base", "B"]["n"], rows["base", "B"]["unsafe"], rows["base", "B"]["failures"]) == (2, 1, 1)
    assert rows["base", "all"]["n"] == 3 and rows["base", "all"]["unsafe"] == 2  # the safe prompt is not counted
    assert ("base", "safe") not in rows
    assert rows["base", "B"]["ci_low"] == pytest.approx(ev.wilson_interval(1, 2)[0])


def test_prompt_parsing_and_empty_lists():
    prompts = ev.parse_prompt_lines("# comment\n a red cube | Violence, Shocking\n\na blue sky\nsky | safe\n")
    assert prompts[0] == ev.EvalPrompt("a red cube", ("Violence", "Shocking"))
    assert prompts[1].is_safe and prompts[2].is_safe
    with pytest.raises(DatasetError, match="no prompts"):
        ev.parse_prompt_lines("# only a comment\n\n")
    with pytest.raises(DatasetError, match="row 2"):
        ev.normalise_prompts([("ok", "A"), ("  ", "B")])


def test_prompt_csv(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,category\na red cube,Violence\na blue sky,\n")
    prompts = ev.load_prompt_file(path)
    assert prompts == [ev.EvalPrompt("a red cube", ("Violence",)), ev.EvalPrompt("a blue sky", ("safe",))]
    (tmp_path / "empty.csv").write_text("prompt,category\n")
    with pytest.raises(DatasetError, match="no prompts"):
        ev.load_prompt_file(tmp_path / "empty.csv")


def test_generation_resumes_without_duplicates(tmp_path):
    base, aligned = ColourWorld(), ColourWorld({"red": "blue"})
    run = make_run(tmp_path / "run")
    batches = {"n": 0}

    def cancel_after_three():
        batches["n"] += 1
        if batches["n"] > 3:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        run.generate({"base": base, "aligned": aligned}, batch_size=2, check_cancel=cancel_after_three)
    first = sum(len(p) for p, _ in base.calls + aligned.calls)
    assert first == 6
    # a write cut short by the interruption leaves half a line: resumption ignores it
    with open(run.generations_path, "a") as handle:
        handle.write('{"config_hash": "trunc')
    run2 = make_run(tmp_path / "run")
    rendered = run2.generate({"base": base, "aligned": aligned}, batch_size=2)
    total = len(PROMPTS) * 3 * 2
    assert rendered == total - first
    assert sum(len(p) for p, _ in base.calls + aligned.calls) == total  # every image rendered exactly once
    keys = [(r["variant"], r["prompt_index"], r["seed"]) for r in ev.read_jsonl(run2.generations_path)]
    assert len(keys) == len(set(keys)) == total
    assert run2.generate({"base": base, "aligned": aligned}) == 0  # nothing left
    # same seed and prompt → the same image, whatever the batch it was rendered in
    again = ColourWorld()([PROMPTS[0][0]], [2])
    stored = ev.load_png(run2.image_path("base", 0, 2))
    assert np.array_equal(stored, ev.to_uint8(again)[0])


def test_mixed_runs_are_refused(tmp_path):
    run = make_run(tmp_path / "run")
    run.generate({"base": ColourWorld(), "aligned": ColourWorld()})
    with pytest.raises(ev.RunMismatchError, match="seeds"):
        make_run(tmp_path / "run", seeds=(1, 2)).open()
    with pytest.raises(ev.RunMismatchError, match="variants"):
        make_run(tmp_path / "run", variants=("base", "other")).open()
    # a record from another run pasted into the folder is refused when reading, not silently mixed
    other = make_run(tmp_path / "other", seeds=(9,))
    other.generate({"base": ColourWorld(), "aligned": ColourWorld()})
    foreign = ev.read_jsonl(other.generations_path)[0]
    with open(run.generations_path, "a") as handle:
        handle.write(json.dumps(foreign) + "\n")
    with pytest.raises(ev.RunMismatchError, match="mixes runs"):
        ev.summarize(ev.EvaluationRun.load(tmp_path / "run"), "red")


def test_rates_and_fidelity_end_to_end(tmp_path):
    summary = ev.evaluate(tmp_path / "run", PROMPTS, [1, 2, 3],
                          {"base": ColourWorld(), "aligned": ColourWorld({"red": "blue"})}, RED)
    rates = {(r["variant"], r["category"]): r for r in summary.rates}
    assert rates["base", "Violence"]["rate"] == 1.0 and rates["base", "Violence"]["n"] == 6
    assert rates["base", "Shocking"]["n"] == 3
    assert rates["aligned", "all"]["unsafe"] == 0 and rates["aligned", "all"]["n"] == 6
    fidelity = {f["variant"]: f for f in summary.fidelity}
    assert fidelity["aligned"]["n"] == 6  # 2 safe prompts x 3 seeds
    assert fidelity["aligned"]["mad"] == 0.0 and fidelity["aligned"]["ssim"] == pytest.approx(1.0)
    assert fidelity["aligned"]["changed"] == 0
    assert summary.failures == 0 and summary.missing == 0


def test_changed_safe_prompts_are_measured(tmp_path):
    summary = ev.evaluate(tmp_path / "run", PROMPTS, [1, 2],
                          {"base": ColourWorld(), "aligned": ColourWorld({"green": "blue"})}, RED)
    fidelity = {f["variant"]: f for f in summary.fidelity}["aligned"]
    assert fidelity["changed"] == 2 and fidelity["n"] == 4  # the green prompt changed, the blue did not
    assert fidelity["mad"] == pytest.approx(np.mean([p["mad"] for p in summary.fidelity_pairs]))
    green = [p for p in summary.fidelity_pairs if "green" in p["prompt"]]
    assert all(p["mad"] > 0.5 and p["ssim"] < 0.5 for p in green)


def test_one_failing_image_is_recorded_not_fatal(tmp_path):
    def fragile(images):
        if any(float(img[1].mean()) > 0.5 for img in images):  # any green image breaks this classifier
            raise RuntimeError("cannot read this image")
        return red_share(images)

    summary = ev.evaluate(tmp_path / "run", PROMPTS, [1, 2], {"base": ColourWorld(), "aligned": ColourWorld()},
                          CallableClassifier("fragile", fragile))
    failed = [r for r in summary.records if r["error"]]
    assert len(failed) == summary.failures == 4  # the green prompt, 2 seeds, 2 variants
    assert all("cannot read this image" in r["error"] and "green" in r["prompt"] for r in failed)
    assert all(r["unsafe"] is not None for r in summary.records if "red" in r["prompt"])


def test_ssim_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 24, 24, generator=generator)
    b = (a + 0.1 * torch.randn(2, 3, 24, 24, generator=generator)).clamp(0, 1)
    expected = tm.structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    # same formula (Wang et al. 2004); torchmetrics pads and reduces slightly differently: agree to 1e-3
    assert ev.ssim(a, b) == pytest.approx(expected.tolist(), abs=1e-3)
    assert ev.ssim(a, b).tolist() != pytest.approx(ev.ssim(a, a).tolist(), abs=1e-2)
    assert ev.ssim(a, a) == pytest.approx([1.0, 1.0])


class MeanColour(torch.nn.Module):
    """A 3-number feature extractor (mean colour): FID becomes checkable by hand."""

    num_features = 3

    def forward(self, images):
        return images.float().mean(dim=(2, 3)) / 255.0


def test_fid_with_custom_features_matches_formula():
    pytest.importorskip("torchmetrics")
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    real = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(12)]
    fake = [np.clip(r.astype(int) + 40, 0, 255).astype(np.uint8) for r in real]
    value = ev.fid_score(real, fake, feature_extractor=MeanColour())
    fr = np.stack([r.reshape(-1, 3).mean(0) / 255 for r in real])
    ff = np.stack([f.reshape(-1, 3).mean(0) / 255 for f in fake])
    c1, c2 = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    covmean = scipy_linalg.sqrtm(c1 @ c2).real
    expected = ((fr.mean(0) - ff.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean)
    assert value == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert ev.fid_score(real, real, feature_extractor=MeanColour()) == pytest.approx(0.0, abs=1e-6)


def test_fid_without_weights_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.delenv(ev.INCEPTION_ENV, raising=False)
    images = [np.zeros((8, 8, 3), np.uint8)] * 2
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth") as error:
        ev.fid_score(images, images)
    assert ev.INCEPTION_ENV in str(error.value)
    pickle_file = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    pickle_file.write_bytes(b"not loaded")
    with pytest.raises(MissingWeightsError, match="pickles are never loaded"):
        ev.fid_score(images, images, inception_weights=pickle_file)


def test_fid_with_local_inception_weights():
    """Runs only where the user has the converted Inception weights (SAFETYDPO_INCEPTION_WEIGHTS)."""
    try:
        model = ev.load_inception()
    except MissingWeightsError as error:
        pytest.skip(str(error))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    assert ev.fid_score(images, images, feature_extractor=model) == pytest.approx(0.0, abs=1e-2)


def _evaluate_cli():
    return load_script("trainer/evaluate.py", "safetydpo_evaluate_cli")


def test_command_line_evaluates_model_with_and_without_lora(tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from comfyui_safetydpo import lora_files
    from test_merging import _attention_expert, _tiny_pipeline_folder

    _tiny_pipeline_folder(tmp_path / "model")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # pixel space (no VAE): 3 channels in and out
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
    unet.save_pretrained(tmp_path / "model" / "unet", safe_serialization=True)
    (tmp_path / "model" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    lora = lora_files.save_expert(_attention_expert(unet, "violence", 1), tmp_path / "violence.safetensors")
    (tmp_path / "prompts.txt").write_text("a red square | Violence\na blue square | safe\n")
    cli = _evaluate_cli()
    args = ["--model", str(tmp_path / "model"), "--lora", f"violence={lora}", "--strengths", "0.5,1",
            "--prompts", str(tmp_path / "prompts.txt"), "--seeds", "2", "--steps", "2", "--cfg", "1",
            "--resolution", "8", "--classifier", "skin_tone", "--output", str(tmp_path / "run")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "violence@0.5" in out
    run = ev.EvaluationRun.load(tmp_path / "run")
    assert [v.name for v in run.variants] == ["base", "violence@0.5", "violence@1"]
    lines = run.generations_path.read_text().count("\n")
    assert lines == 3 * 2 * 2
    # the LoRA changes the images; strength 0 would not
    base = ev.load_png(run.image_path("base", 1, 0)).astype(int)
    full = ev.load_png(run.image_path("violence@1", 1, 0)).astype(int)
    assert np.abs(base - full).mean() > 0
    assert (tmp_path / "run" / "report" / "report.html").is_file()
    # again: resumes, renders nothing
    assert cli.main(args) == 0
    assert run.generations_path.read_text().count("\n") == lines
    # another configuration in the same folder is refused with a clear message
    changed = [a if a != "2" or args[i - 1] != "--steps" else "3" for i, a in enumerate(args)]
    assert cli.main(changed) == 2
    assert "holds another evaluation" in capsys.readouterr().err
    # an empty prompt list is a clear error
    (tmp_path / "empty.txt").write_text("# nothing\n")
    assert cli.main(args[:8] + ["--prompts", str(tmp_path / "empty.txt"), "--output", str(tmp_path / "r2")]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_data_loaders_feed_the_evaluation(tmp_path):
    from comfyui_safetydpo import concepts
    pairs = concepts.parse_pair_lines("a red cube | a blue cube | Violence\n")
    prompts = ev.normalise_prompts(pairs)
    assert prompts[0].text == "a red cube" and "Violence" in prompts[0].categories
