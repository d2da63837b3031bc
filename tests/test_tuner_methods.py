"""The tuner's pieces that touch a model, on the tiny llama: soft-prompt initialisation
from text, the base's cached answers and top-k, the KL-to-base term, and the
before/after measurements of the quality report."""
from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from hotswap.server.config import ModelConfig
from hotswap.server.model.loader import load_base_model
from hotswap.tuner import methods, quality
from hotswap.tuner.generation import greedy, render
from hotswap.tuner.objective import Collator, PreservingTrainer
from hotswap.tuner.replay import MAX_ANSWER_TOKENS, TOP_K, BaseAnswers, replay_examples
from hotswap.tuner.spec import Hyperparameters

TEXT = "the quick brown fox"
PROMPTS = ["Who are you?", "Tell me a joke.", "What is 7 times 8?"]


@pytest.fixture()
def loaded(tiny_checkpoints):
    return load_base_model(ModelConfig(source=str(tiny_checkpoints["llama"]), dtype="float32", device="cpu"))


def test_prefix_starts_as_the_base_reading_the_text(loaded):
    """The initialised prefix is exactly the base's keys/values for the text: the adapter's
    logits equal the base's on text + prompt (PEFT places the prompt after the prefix)."""
    tok = loaded.tokenizer
    model = get_peft_model(loaded.model, methods.peft_config("prefix_tuning", Hyperparameters(num_virtual_tokens=6), loaded))
    methods.init_prefix_from_text(model, tok, TEXT)
    prompt, prefix = tok("who are you", add_special_tokens=False)["input_ids"], methods.text_ids(tok, TEXT, 6)
    assert len(prefix) == 6 and tok.decode(prefix).startswith(TEXT)  # repeated to fill the virtual tokens
    with torch.no_grad():
        adapted = model(input_ids=torch.tensor([prompt])).logits[0]
        with model.disable_adapter():
            base = model(input_ids=torch.tensor([prefix + prompt])).logits[0, len(prefix):]
    torch.testing.assert_close(adapted, base, rtol=1e-4, atol=1e-4)


def test_p_tuning_encoder_starts_by_emitting_the_text(loaded):
    tok = loaded.tokenizer
    model = get_peft_model(loaded.model, methods.peft_config("p_tuning", Hyperparameters(num_virtual_tokens=6), loaded))
    encoder = model.prompt_encoder["default"]
    target = model.get_input_embeddings()(torch.tensor(methods.text_ids(tok, TEXT, 6))).detach()
    with torch.no_grad():
        before = (encoder(torch.arange(6)) - target).norm() / target.norm()
    methods.init_prompt_encoder_from_text(model, tok, TEXT)
    with torch.no_grad():
        after = (encoder(torch.arange(6)) - target).norm() / target.norm()
    assert before > 0.5 and after < 0.05


def test_prompt_tuning_init_text_is_the_training_answers(loaded):
    tok = loaded.tokenizer
    fox = len(tok("the fox", add_special_tokens=False)["input_ids"])
    answers = ["the fox", "the fox", "", "the dog", "the cat"]
    assert methods.init_text(answers, tok, tokens=fox) == "the fox"
    assert methods.init_text(answers, tok, tokens=fox + 1) == "the fox the dog"  # distinct answers, until they cover the tokens


def test_kl_term_is_zero_at_the_base_and_pulls_back_towards_it(loaded, tmp_path):
    """The base's cached top-k are its own distribution: a fresh LoRA (B = 0, the base
    exactly) has KL ≈ 0 on replay rows; a perturbed one has KL > 0 and a gradient."""
    from transformers import TrainingArguments

    tok = loaded.tokenizer
    cache = BaseAnswers.for_base(tmp_path, "fp", "none", "float32")
    answers = cache.get(loaded.model, tok, PROMPTS)
    assert all(len(a.top_ids[0]) == TOP_K and len(a.top_ids) == len(a.ids) + a.finished for a in answers.values())
    assert cache.get(None, tok, PROMPTS) == answers  # cached: no model needed the second time
    assert [a.ids for a in answers.values()] == [a.ids for a in greedy(loaded.model, tok, [render(tok, p) for p in PROMPTS], MAX_ANSWER_TOKENS)]

    model = get_peft_model(loaded.model, methods.peft_config("lora", Hyperparameters(lora_alpha=32.0), loaded))
    rows = replay_examples(answers, tok, "kl")
    assert all(set(r["labels"]) == {-100} for r in rows)  # "kl": no ordinary loss on replay rows
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, remove_unused_columns=False)
    trainer = PreservingTrainer(model=model, args=args, kl_weight=1.0)
    batch = Collator(tok.pad_token_id)(rows)
    assert batch["kl_mask"].sum() == sum(len(a.top_ids) for a in answers.values())
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    assert loss.item() > 0.01 and any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)

    both = replay_examples(answers, tok, "replay+kl")
    assert [r["labels"] for r in both] == [r["labels"] for r in replay_examples(answers, tok, "replay")]


def test_an_adapter_that_changes_nothing_reports_no_change(loaded):
    """Fresh LoRA (the base exactly): every control answer unchanged, agreement 1."""
    tok = loaded.tokenizer
    prompts = quality.control_prompts(tok)
    before = quality.generate(loaded.model, tok, prompts)
    base_top1 = quality.top1(loaded.model, prompts, before)
    model = get_peft_model(loaded.model, methods.peft_config("lora", Hyperparameters(lora_alpha=32.0), loaded))
    after = quality.generate(model, tok, prompts)
    agreement = quality.agreement(base_top1, quality.top1(model, prompts, before))
    report = quality.report(prompts, before, after, tok, agreement, 1.0, None)
    assert report.control_changed == 0.0 and report.control_agreement == 1.0 and report.control_prompts == len(prompts)
    assert all(s.before == s.after and s.kind == "control" for s in report.samples)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "p_tuning", "prefix_tuning"])
def test_loss_on_the_kept_positions_equals_transformers_own(loaded, tmp_path, method):
    """Logits only where a loss is taken (logits_to_keep), prompt tuning's virtual positions
    skipped: the same loss as the model's own cross-entropy over full logits."""
    from transformers import TrainingArguments

    from hotswap.tuner.data import detect_format, tokenize

    tok = loaded.tokenizer
    model = get_peft_model(loaded.model, methods.peft_config(method, Hyperparameters(lora_alpha=32.0, num_virtual_tokens=4), loaded))
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "the fox " * (i + 1)}]} for i, q in enumerate(PROMPTS)]
    batch = Collator(tok.pad_token_id)(tokenize(rows, detect_format(rows, "train"), tok, 512, False, "train").examples)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, remove_unused_columns=False)
    trainer = PreservingTrainer(model=model, args=args, virtual_tokens=4 if method in ("prompt_tuning", "p_tuning") else 0)
    assert trainer.keeps_logits
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        theirs = model(**batch).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_dropout_on_moe_expert_targets_is_refused_naming_lora_dropout(tmp_path):
    """PEFT >= 0.22 turns "all-linear" on an MoE model into LoRA on its fused experts and router, which
    it trains without dropout: the job fails on hyperparameters.lora_dropout, not with PEFT's class name."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from conftest import save_tiny_checkpoint
    from hotswap.server.errors import InvalidArgument
    from tiny_archs import ARCHS

    ckpt = save_tiny_checkpoint(ARCHS["qwen2_moe"](), tmp_path / "moe")
    with pytest.raises(InvalidArgument) as e:
        methods.wrap(AutoModelForCausalLM.from_pretrained(ckpt), LoraConfig(r=2, lora_dropout=0.05, target_modules="all-linear"))
    assert e.value.field == "hyperparameters.lora_dropout"
    model = methods.wrap(AutoModelForCausalLM.from_pretrained(ckpt), LoraConfig(r=2, lora_dropout=0.0, target_modules="all-linear"))
    assert model.peft_config["default"].target_parameters  # the experts really are targeted


@pytest.mark.parametrize("arch,groups", [("mixtral", [["w1", "w3"], ["w2"], ["gate"]]),
                                          ("qwen2_moe", [["gate"], ["gate_proj", "up_proj"], ["down_proj"]])])
def test_moe_names_peft_turns_into_expert_targets_pass_the_jobs_target_check(arch, groups):
    """Mixtral's w1 / w2 / w3 and the routers' "gate" are no linear in transformers v5 (fused expert parameters,
    router modules), but PEFT >= 0.22 maps them to target_parameters and the server serves those: the job's
    target check takes each set PEFT accepts, and refuses half of a fused weight as PEFT would, at submission."""
    import peft
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, MixtralConfig

    from hotswap.server.errors import AdapterIncompatible
    from hotswap.tuner.spec import Hyperparameters, TrainSpec, check_against_base, linear_names
    from tiny_archs import ARCHS

    if tuple(int(x) for x in peft.__version__.split(".")[:2]) < (0, 22):
        pytest.skip("PEFT < 0.22 converts no MoE names")
    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2) if arch == "mixtral" else ARCHS[arch]()
    model = AutoModelForCausalLM.from_config(cfg)
    names = linear_names(model)

    def spec(targets: list[str]) -> TrainSpec:
        return TrainSpec(adapter_name="moe", method="lora", train={"inline": []},
                         hyperparameters=Hyperparameters(target_modules=targets, lora_dropout=0.0))

    for targets in groups:
        check_against_base(spec(targets), names, 64, base=model)
        wrapped = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=2, target_modules=targets))
        assert wrapped.peft_config["default"].target_parameters  # PEFT did turn them into expert / router targets
    check_against_base(spec([n for g in groups for n in g]), names, 64, base=model)
    with pytest.raises(AdapterIncompatible, match="without also targeting") as e:
        check_against_base(spec(groups[0][:1] if len(groups[0]) > 1 else groups[1][:1]), names, 64, base=model)
    assert e.value.field == "hyperparameters.target_modules"
    with pytest.raises(AdapterIncompatible, match="w9"):
        check_against_base(spec(["w9"]), names, 64, base=model)
