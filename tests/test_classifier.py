"""The `<COMP>`-position classifier: labels, final-norm features, the feature cache, training, saving and the policy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_model
from dyncomp.classifier import features as features_module
from dyncomp.classifier.features import (
    FeatureSet,
    FinalNormCapture,
    extract_features,
    find_final_norm,
    load_or_extract_features,
    reasoning_labels,
    reasoning_positions,
)
from dyncomp.classifier.probe import ClassifierInfo, Probe, ProbeConfig, TrainedClassifier, load_classifier, save_classifier
from dyncomp.classifier.train import THRESHOLDS, choose_tau, score_predictions, train_probe
from dyncomp.cli import main
from dyncomp.compression.lora import CompressorConfig, attach_conditional_lora, save_compressor
from dyncomp.data.annotated import AnnotatedExample
from dyncomp.errors import UserError
from dyncomp.models.compressed import CompressedModel
from dyncomp.models.tokens import CompTokens, register_comp_tokens, token_record
from dyncomp.policies import DecodeState, make_policy
from dyncomp.training.encoding import Reasoning, insert_comp, pad_batch, tokenize_reasoning

COMP_ID = 99
EOS_ID = 2


def hand_made_reasoning(boundaries: list[int]) -> Reasoning:
    reasoning_ids = [10, 11, 12, 13, 14, EOS_ID]
    return Reasoning(
        id="hand",
        prompt_ids=[5, 6, 7],
        reasoning_ids=reasoning_ids,
        oracle_boundaries=boundaries,
        step_index=[0] * len(reasoning_ids),
        number_token=[False] * len(reasoning_ids),
    )


def annotated_example(index: int) -> AnnotatedExample:
    a, b = index + 3, index + 5
    reasoning = (
        f"First, {a} apples and {b} pears make {a} + {b} = {a + b} fruits. <COMP>\n\n"
        f"Then half of them is {a + b} / 2 = {(a + b) / 2}. <COMP>\n\n"
        f"So the answer is {(a + b) / 2}.\n#### {(a + b) / 2}"
    )
    return AnnotatedExample(id=f"ex-{index}", question=f"Question {index}: {a} apples and {b} pears, how many is half?", reasoning=reasoning, answer=str((a + b) / 2))


def annotated_records(count: int) -> list[dict]:
    return [annotated_example(index).to_dict() for index in range(count)]


def compressed_tiny(tokenizer, seed: int = 0) -> CompressedModel:
    """A tiny Llama with SmolLM2's tokenizer, `<COMP>` registered and an untrained conditional LoRA."""
    model = make_tiny_model("llama", vocab_size=len(tokenizer), seed=seed)
    comp = register_comp_tokens(model, tokenizer, 1)
    config = CompressorConfig()
    peft_model = attach_conditional_lora(model, comp, config)
    peft_model.eval()
    return CompressedModel(peft_model, tokenizer, comp, config, source="tiny-llama", trained=False)


def save_tiny_compressor(loaded: CompressedModel, folder, scale: float = 0.0):
    """Save the adapter of `loaded` to `folder`, after setting its lora_B weights to `scale` so they write something."""
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if "lora_B" in name:
                parameter.fill_(scale)
    record = token_record(loaded.model, loaded.tokenizer, loaded.comp, loaded.source)
    return save_compressor(loaded.model, folder, record, loaded.config)


def separable_features(count: int, hidden: int, seed: int, positive_rate: float = 0.05, samples: int = 40) -> FeatureSet:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.rand(count, generator=generator) < positive_rate
    features = torch.randn(count, hidden, generator=generator)
    features[labels, 0] += 4.0
    sample_index = torch.arange(count) * samples // count
    return FeatureSet(features.half(), labels, sample_index, [f"s{i}" for i in range(samples)], [], key="synthetic")


# ---------------------------------------------------------------------------
# Labels


def test_labels_hand_made_sequence():
    reasoning = hand_made_reasoning([1, 3])
    labels = reasoning_labels(reasoning, EOS_ID)
    assert labels == [False, True, False, True, False]

    comp = CompTokens(strings=("<COMP>",), ids=(COMP_ID,))
    sequence = insert_comp(reasoning, reasoning.oracle_boundaries, comp)
    assert sequence.input_ids == [5, 6, 7, 10, 11, COMP_ID, 12, 13, COMP_ID, 14, EOS_ID]
    positions = reasoning_positions(sequence, len(labels))
    assert positions == [3, 4, 6, 7, 9]
    for position, label in zip(positions, labels):
        assert (sequence.input_ids[position + 1] == COMP_ID) == label

    plain = insert_comp(reasoning, [], None)
    assert reasoning_positions(plain, len(labels)) == [3, 4, 5, 6, 7]


def test_labels_skip_final_boundary_and_keep_without_eos():
    reasoning = hand_made_reasoning([1, 5])
    assert reasoning_labels(reasoning, EOS_ID) == [False, True, False, False, False]
    assert reasoning_labels(reasoning, eos_token_id=None) == [False, True, False, False, False, False]


def test_labels_match_markers_with_real_tokenizer(packaged_tokenizer):
    example = annotated_example(0)
    reasoning = tokenize_reasoning(packaged_tokenizer, example.id, example.question, example.steps())
    labels = reasoning_labels(reasoning, packaged_tokenizer.eos_token_id)
    assert sum(labels) == example.num_markers
    assert len(labels) == len(reasoning.reasoning_ids) - 1

    comp = CompTokens(strings=("<COMP>",), ids=(len(packaged_tokenizer),))
    sequence = insert_comp(reasoning, reasoning.oracle_boundaries, comp)
    positions = reasoning_positions(sequence, len(labels))
    following = [sequence.input_ids[position + 1] for position, label in zip(positions, labels) if label]
    assert following == [comp.ids[0]] * example.num_markers
    assert all(sequence.input_ids[p] != comp.ids[0] for p in positions)
    assert min(positions) >= sequence.prompt_length


# ---------------------------------------------------------------------------
# FinalNormCapture


def test_capture_equals_last_hidden_state(tiny_model):
    input_ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    norm = find_final_norm(tiny_model)
    with torch.no_grad(), FinalNormCapture(tiny_model) as capture:
        outputs = tiny_model(input_ids=input_ids, output_hidden_states=True)
        captured = capture.output
    assert captured.shape == (2, 9, 64)
    assert torch.equal(captured, outputs.hidden_states[-1])
    assert len(norm._forward_hooks) == 0


def test_capture_finds_norm_through_peft(packaged_tokenizer):
    loaded = compressed_tiny(packaged_tokenizer)
    assert find_final_norm(loaded.model) is loaded.model.get_base_model().model.norm


def test_capture_removes_hook_on_error():
    model = make_tiny_model("llama")
    norm = find_final_norm(model)
    with pytest.raises(RuntimeError, match="boom"):
        with FinalNormCapture(model):
            assert len(norm._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(norm._forward_hooks) == 0


# ---------------------------------------------------------------------------
# Feature extraction and the cache


@torch.no_grad()
def test_extracted_features_match_manual_forward(packaged_tokenizer):
    torch.manual_seed(0)
    loaded = compressed_tiny(packaged_tokenizer)
    examples = [annotated_example(index) for index in range(3)]
    compressed = extract_features(loaded, examples, mode="compressed", batch_size=2)
    plain = extract_features(loaded, examples, mode="uncompressed", batch_size=2)
    assert torch.equal(compressed.labels, plain.labels)
    assert torch.equal(compressed.sample_index, plain.sample_index)
    assert compressed.gold_markers().tolist() == [2, 2, 2]

    # One trace at a time, read from output_hidden_states, with no padding and no cache.
    reasoning = tokenize_reasoning(packaged_tokenizer, examples[1].id, examples[1].question, examples[1].steps())
    labels = reasoning_labels(reasoning, packaged_tokenizer.eos_token_id)
    rows = compressed.sample_index == 1
    for mode, feature_set in (("compressed", compressed), ("uncompressed", plain)):
        boundaries = reasoning.oracle_boundaries if mode == "compressed" else []
        sequence = insert_comp(reasoning, boundaries, loaded.comp if mode == "compressed" else None)
        batch = pad_batch([sequence], packaged_tokenizer.pad_token_id)
        if mode == "compressed":
            outputs = loaded.model(
                input_ids=batch["input_ids"], output_hidden_states=True, use_cache=False,
                attention_mask=_compression_mask(batch, loaded), position_ids=_positions(batch),
            )
        else:
            outputs = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True, use_cache=False)
        expected = outputs.hidden_states[-1][0, reasoning_positions(sequence, len(labels))]
        torch.testing.assert_close(feature_set.features[rows].float(), expected, atol=2e-3, rtol=2e-3)


def _compression_mask(batch, loaded):
    from dyncomp.compression.masks import build_compression_mask

    return build_compression_mask(batch["input_ids"], batch["attention_mask"], batch["prompt_mask"], loaded.comp.ids, mode="concat", keep_prompt=True, dtype=torch.float32)


def _positions(batch):
    from dyncomp.compression.masks import logical_position_ids

    return logical_position_ids(batch["attention_mask"])


def test_modes_agree_before_first_comp_only(packaged_tokenizer):
    loaded = compressed_tiny(packaged_tokenizer)
    example = annotated_example(0)
    compressed = extract_features(loaded, [example], mode="compressed")
    plain = extract_features(loaded, [example], mode="uncompressed")
    first_boundary = int(compressed.labels.nonzero()[0])
    difference = (compressed.features.float() - plain.features.float()).abs().amax(dim=-1)  # (positions,)
    assert float(difference[: first_boundary + 1].max()) < 1e-2
    assert float(difference[first_boundary + 1 :].max()) > 1e-2


def test_too_long_traces_left_out(packaged_tokenizer):
    loaded = compressed_tiny(packaged_tokenizer)
    short = annotated_example(0)
    long = AnnotatedExample(id="long", question=short.question * 3, reasoning=short.reasoning, answer=short.answer)
    reasoning = tokenize_reasoning(packaged_tokenizer, short.id, short.question, short.steps())
    short_length = len(insert_comp(reasoning, reasoning.oracle_boundaries, loaded.comp).input_ids)
    for mode in ("compressed", "uncompressed"):
        features = extract_features(loaded, [long, short], mode=mode, max_length=short_length)
        assert features.ids == ["ex-0"]
        assert features.left_out_ids == ["long"]
        assert torch.all(features.sample_index == 0)


def test_all_traces_too_long_rejected(packaged_tokenizer):
    loaded = compressed_tiny(packaged_tokenizer)
    with pytest.raises(UserError, match="--max-length 10"):
        extract_features(loaded, [annotated_example(0)], mode="compressed", max_length=10)


def test_feature_cache_reuse_and_invalidation(packaged_tokenizer, tmp_path, monkeypatch):
    loaded = compressed_tiny(packaged_tokenizer)
    compressor = save_tiny_compressor(loaded, tmp_path / "compressor", scale=0.0)
    examples = [annotated_example(index) for index in range(2)]
    calls = []
    real_extract = features_module.extract_features

    def counting_extract(*args, **kwargs):
        calls.append(kwargs["mode"])
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(features_module, "extract_features", counting_extract)
    cache = tmp_path / "cache"

    def features_for(example_list, mode="compressed"):
        return load_or_extract_features(loaded, example_list, compressor=compressor, mode=mode, cache=cache)

    first = features_for(examples)
    second = features_for(examples)
    assert len(calls) == 1
    assert second.key == first.key
    assert torch.equal(second.features, first.features)
    assert torch.equal(second.labels, first.labels)
    assert second.ids == first.ids

    changed = [examples[0], annotated_example(7)]
    features_for(changed)
    assert len(calls) == 2

    features_for(examples, mode="uncompressed")
    assert len(calls) == 3

    save_tiny_compressor(loaded, compressor, scale=0.01)
    retrained = features_for(examples)
    assert len(calls) == 4
    assert retrained.key != first.key
    assert len(list(cache.glob("*.safetensors"))) == 4


def test_unreadable_cache_rejected(packaged_tokenizer, tmp_path):
    loaded = compressed_tiny(packaged_tokenizer)
    cache = tmp_path / "cache"
    features = load_or_extract_features(loaded, [annotated_example(0)], compressor=None, cache=cache)
    (cache / f"{features.key}.safetensors").write_bytes(b"broken")
    with pytest.raises(UserError, match="delete it and rerun"):
        load_or_extract_features(loaded, [annotated_example(0)], compressor=None, cache=cache)


# ---------------------------------------------------------------------------
# Training and metrics


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_probe_learns_separable_features(kind):
    train = separable_features(4000, 16, seed=0)
    validation = separable_features(1000, 16, seed=1)
    probe, history = train_probe(train, validation, ProbeConfig(input_size=16, kind=kind, hidden=32), epochs=10, patience=3, batch_size=256, learning_rate=1e-2)
    metrics = score_predictions(_probabilities(probe, validation), validation)
    assert metrics["auprc"] > 0.9
    assert metrics["auroc"] > 0.98
    assert max(entry["validation_auprc"] for entry in history) == pytest.approx(metrics["auprc"], abs=1e-9)


def test_probe_training_is_seeded():
    train = separable_features(2000, 8, seed=0)
    validation = separable_features(500, 8, seed=1)
    first, _ = train_probe(train, validation, ProbeConfig(input_size=8), epochs=2, seed=3)
    second, _ = train_probe(train, validation, ProbeConfig(input_size=8), epochs=2, seed=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_training_without_positives_rejected():
    train = separable_features(500, 8, seed=0, positive_rate=0.0)
    validation = separable_features(500, 8, seed=1)
    with pytest.raises(UserError, match="both classes are needed"):
        train_probe(train, validation, ProbeConfig(input_size=8), epochs=1)


def test_threshold_sweep_counts_markers():
    labels = torch.tensor([False, True, False, False, True, False])
    sample_index = torch.tensor([0, 0, 0, 1, 1, 1])
    features = FeatureSet(torch.zeros(6, 2, dtype=torch.float16), labels, sample_index, ["a", "b"], [], key="")
    probabilities = torch.tensor([0.1, 0.97, 0.72, 0.2, 0.8, 0.3])
    metrics = score_predictions(probabilities, features)
    assert [row["tau"] for row in metrics["thresholds"]] == list(THRESHOLDS)
    assert metrics["auroc"] == 1.0
    assert metrics["gold_markers_per_sample"] == 1.0
    at_half = metrics["thresholds"][0]
    assert at_half["precision"] == pytest.approx(2 / 3)
    assert at_half["recall"] == 1.0
    assert at_half["markers_per_sample"] == 1.5
    assert at_half["marker_count_abs_error"] == 0.5
    at_075 = next(row for row in metrics["thresholds"] if row["tau"] == 0.75)
    assert at_075["f1"] == 1.0
    # F1 is 1.0 for tau 0.75 and 0.80; a tie goes to the larger tau.
    assert choose_tau(metrics) == 0.8
    at_top = metrics["thresholds"][-1]
    assert at_top["tau"] == 0.95
    assert at_top["recall"] == 0.5


def test_threshold_sweep_without_predictions_reports_nan():
    features = FeatureSet(torch.zeros(2, 2, dtype=torch.float16), torch.tensor([False, True]), torch.tensor([0, 0]), ["a"], [], key="")
    metrics = score_predictions(torch.tensor([0.1, 0.2]), features)
    assert math.isnan(metrics["thresholds"][0]["precision"])
    assert metrics["thresholds"][0]["recall"] == 0.0


def _probabilities(probe: Probe, features: FeatureSet) -> torch.Tensor:
    from dyncomp.classifier.train import predict

    return predict(probe, features.features)


# ---------------------------------------------------------------------------
# Saving and loading


def classifier_info(loaded: CompressedModel, tau: float = 0.8) -> ClassifierInfo:
    return ClassifierInfo(
        probe=ProbeConfig(input_size=64, hidden=16),
        record=token_record(loaded.model, loaded.tokenizer, loaded.comp, loaded.source),
        compressor=None,
        feature_mode="compressed",
        tau=tau,
        tau_rule="fixed for a test",
        num_hidden_layers=2,
        max_length=768,
        dtype="torch.float32",
    )


def test_save_load_round_trip(packaged_tokenizer, tmp_path):
    loaded = compressed_tiny(packaged_tokenizer)
    info = classifier_info(loaded)
    torch.manual_seed(0)
    probe = Probe(info.probe)
    probe.set_normalization(torch.randn(64), torch.rand(64) + 0.5)
    probe.eval()
    save_classifier(tmp_path / "clf", probe, info)

    restored = load_classifier(tmp_path / "clf")
    assert restored.info == info
    hidden = torch.randn(5, 64)
    assert torch.equal(restored.probe.probability(hidden), probe.probability(hidden))
    assert not restored.probe.training
    restored.check_model(loaded.model, loaded.tokenizer, loaded.comp, loaded.source)


def test_loading_onto_other_model_raises(packaged_tokenizer, tmp_path):
    loaded = compressed_tiny(packaged_tokenizer, seed=0)
    info = classifier_info(loaded)
    save_classifier(tmp_path / "clf", Probe(info.probe), info)
    other = compressed_tiny(packaged_tokenizer, seed=1)
    other.source = "other-llama"
    classifier = load_classifier(tmp_path / "clf")
    with pytest.raises(UserError, match="classifier .*'tiny-llama'.*'other-llama'"):
        classifier.check_model(other.model, other.tokenizer, other.comp, other.source)


def test_missing_weights_rejected(packaged_tokenizer, tmp_path):
    loaded = compressed_tiny(packaged_tokenizer)
    info = classifier_info(loaded)
    save_classifier(tmp_path / "clf", Probe(info.probe), info)
    (tmp_path / "clf" / "probe.safetensors").unlink()
    with pytest.raises(UserError, match="no probe.safetensors"):
        load_classifier(tmp_path / "clf")


def test_mismatched_weights_rejected(packaged_tokenizer, tmp_path):
    loaded = compressed_tiny(packaged_tokenizer)
    info = classifier_info(loaded)
    save_classifier(tmp_path / "clf", Probe(ProbeConfig(input_size=64, hidden=32)), info)
    with pytest.raises(UserError, match="does not match .*size mismatch"):
        load_classifier(tmp_path / "clf")


def test_changed_compressor_rejected(packaged_tokenizer, tmp_path):
    loaded = compressed_tiny(packaged_tokenizer)
    compressor = save_tiny_compressor(loaded, tmp_path / "compressor", scale=0.0)
    from dyncomp.classifier.features import compressor_fingerprint

    info = classifier_info(loaded)
    info.compressor = compressor_fingerprint(compressor)
    classifier = TrainedClassifier(Probe(info.probe), info, tmp_path / "clf")
    classifier.check_compressor(compressor)
    with pytest.raises(UserError, match="pass --compressor"):
        classifier.check_compressor(None)
    save_tiny_compressor(loaded, compressor, scale=0.01)
    with pytest.raises(UserError, match="changed since"):
        classifier.check_compressor(compressor)


# ---------------------------------------------------------------------------
# The policy


def threshold_classifier(tau: float = 0.8) -> TrainedClassifier:
    """A linear probe whose probability is sigmoid(4 * hidden[0]), on hidden size 4."""
    config = ProbeConfig(input_size=4, kind="linear")
    probe = Probe(config)
    with torch.no_grad():
        linear = probe.head[0]
        linear.weight.zero_()
        linear.weight[0, 0] = 4.0
        linear.bias.zero_()
    probe.eval()
    info = ClassifierInfo(
        probe=config, record={"base_model": "tiny"}, compressor=None, feature_mode="compressed",
        tau=tau, tau_rule="fixed for a test", num_hidden_layers=2, max_length=768, dtype="torch.float32",
    )
    return TrainedClassifier(probe, info, path=None)


def decode_state(first_features: list[float], step_lengths: list[int]) -> DecodeState:
    hidden = torch.zeros(len(first_features), 4)
    hidden[:, 0] = torch.tensor(first_features)
    return DecodeState(last_tokens=torch.zeros(len(first_features), dtype=torch.long), step_lengths=torch.tensor(step_lengths), hidden=hidden)


def test_classifier_policy_decides_per_row():
    # sigmoid(4 * x) for x = 1, -1, 0.3, 0.5: 0.982, 0.018, 0.769, 0.881
    state = decode_state([1.0, -1.0, 0.3, 0.5], [20, 20, 20, 3])
    saved_tau = make_policy("classifier", classifier=threshold_classifier(tau=0.8))
    assert saved_tau.needs_hidden
    assert saved_tau.decide(state).tolist() == [True, False, False, True]
    assert saved_tau.should_compress(state).tolist() == [True, False, False, False]
    assert saved_tau.spec() == "classifier:0.8"

    lower = make_policy("classifier:0.75", classifier=threshold_classifier(tau=0.8))
    assert lower.decide(state).tolist() == [True, False, True, True]
    assert lower.spec() == "classifier:0.75"


def test_classifier_policy_hidden_bfloat16():
    policy = make_policy("classifier:0.5", classifier=threshold_classifier())
    state = decode_state([1.0, -1.0], [20, 20])
    state.hidden = state.hidden.to(torch.bfloat16)
    assert policy.decide(state).tolist() == [True, False]


def test_classifier_policy_without_classifier():
    with pytest.raises(UserError, match="pass --classifier"):
        make_policy("classifier:0.9")


@pytest.mark.parametrize("argument", ["high", "1.5", "0", "nan"])
def test_classifier_policy_invalid_tau(argument):
    with pytest.raises(UserError, match="between 0 and 1"):
        make_policy(f"classifier:{argument}", classifier=threshold_classifier())


def test_classifier_policy_wrong_hidden_size():
    policy = make_policy("classifier:0.5", classifier=threshold_classifier())
    state = DecodeState(last_tokens=torch.zeros(2, dtype=torch.long), step_lengths=torch.tensor([9, 9]), hidden=torch.zeros(2, 8))
    with pytest.raises(UserError, match="hidden size 4"):
        policy.decide(state)


# ---------------------------------------------------------------------------
# Command line


@pytest.fixture
def annotated_file(tmp_path):
    path = tmp_path / "annotated.json"
    path.write_text(json.dumps(annotated_records(40)))
    return path


@pytest.fixture
def tiny_folder(tmp_path, packaged_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(packaged_tokenizer))
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    packaged_tokenizer.save_pretrained(folder)
    return folder


def test_cli_train_missing_data_exits_2(tmp_path, capsys):
    code = main(["train-classifier", "--data", str(tmp_path / "absent.json"), "--out", str(tmp_path / "clf")])
    assert code == 2
    assert "annotated reasoning file not found" in capsys.readouterr().err


def test_cli_train_invalid_hidden_exits_2(tmp_path, annotated_file, capsys):
    code = main(["train-classifier", "--data", str(annotated_file), "--out", str(tmp_path / "clf"), "--hidden", "0"])
    assert code == 2
    assert "--hidden must be at least 1" in capsys.readouterr().err


def test_cli_eval_missing_classifier_exits_2(tmp_path, annotated_file, capsys):
    code = main(["eval-classifier", "--classifier", str(tmp_path / "absent"), "--data", str(annotated_file), "--out", str(tmp_path / "eval")])
    assert code == 2
    assert "classifier folder not found" in capsys.readouterr().err


def test_cli_train_existing_out_exits_2(tmp_path, annotated_file, packaged_tokenizer, capsys):
    loaded = compressed_tiny(packaged_tokenizer)
    save_classifier(tmp_path / "clf", Probe(ProbeConfig(input_size=64)), classifier_info(loaded))
    code = main(["train-classifier", "--data", str(annotated_file), "--out", str(tmp_path / "clf")])
    assert code == 2
    assert "already contains a trained classifier" in capsys.readouterr().err


def test_cli_train_and_eval_tiny_model(tmp_path, annotated_file, tiny_folder, monkeypatch, capsys):
    monkeypatch.setenv("DYNCOMP_CACHE", str(tmp_path / "cache"))
    common = ["--feature-cache", str(tmp_path / "features"), "--batch-size", "4"]
    train_args = ["train-classifier", "--model", str(tiny_folder), "--data", str(annotated_file), "--epochs", "3", "--hidden", "16", *common]
    assert main([*train_args, "--out", str(tmp_path / "clf")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train_traces"] == 36
    assert shown["validation_traces"] == 2
    assert shown["chosen_tau"] in THRESHOLDS

    info = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert info["feature_mode"] == "compressed"
    assert info["probe"] == {"input_size": 64, "kind": "mlp", "hidden": 16, "dropout": 0.1}
    assert info["record"]["base_model"] == str(tiny_folder)
    assert info["compressor"] is None
    assert (tmp_path / "clf" / "validation_report.md").is_file()
    assert len(list((tmp_path / "features").glob("compressed-*.safetensors"))) == 2

    # The second run finds both feature sets in the cache.
    assert main([*train_args, "--out", str(tmp_path / "clf-again")]) == 0
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2
    again = json.loads((tmp_path / "clf-again" / "classifier.json").read_text())
    assert again["training"] == info["training"]

    for mode in ("compressed", "uncompressed"):
        out = tmp_path / f"eval-{mode}"
        assert main(["eval-classifier", "--classifier", str(tmp_path / "clf"), "--data", str(annotated_file), "--out", str(out), "--features", mode, *common]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["context"]["feature_mode"] == mode
        assert metrics["samples"] == 2
        assert metrics["chosen_tau"] == info["tau"]
        assert metrics["tau_rule"] == info["tau_rule"]
        assert [row["tau"] for row in metrics["thresholds"]] == list(THRESHOLDS)
        assert 0.0 <= metrics["auprc"] <= 1.0
        assert "| τ | precision |" in (out / "report.md").read_text()


def test_cli_compressor_recorded_and_checked(tmp_path, annotated_file, tiny_folder, monkeypatch, capsys):
    from dyncomp.models.compressed import load_compressed_model

    monkeypatch.setenv("DYNCOMP_CACHE", str(tmp_path / "cache"))
    loaded = load_compressed_model(str(tiny_folder), None, device="cpu")
    compressor = save_tiny_compressor(loaded, tmp_path / "compressor", scale=0.01)
    common = ["--data", str(annotated_file), "--feature-cache", str(tmp_path / "features"), "--limit", "8"]
    train_args = ["train-classifier", "--model", str(tiny_folder), "--compressor", str(compressor), "--out", str(tmp_path / "clf"), "--epochs", "2"]
    assert main([*train_args, *common]) == 0
    info = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert info["compressor"]["path"] == "../compressor"
    assert (tmp_path / "clf" / info["compressor"]["path"]).resolve() == compressor.resolve()
    assert len(info["compressor"]["sha256"]) == 64

    eval_args = ["eval-classifier", "--classifier", str(tmp_path / "clf"), *common]
    assert main([*eval_args, "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["context"]["compressor"]["sha256"] == info["compressor"]["sha256"]
    capsys.readouterr()

    save_tiny_compressor(loaded, compressor, scale=0.02)
    assert main([*eval_args, "--out", str(tmp_path / "eval-again")]) == 2
    assert "changed since classifier" in capsys.readouterr().err
