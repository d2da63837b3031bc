"""The PEFT configuration of each training method, from the job's resolved hyperparameters."""
from __future__ import annotations

import math

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

from hotswap.server.errors import InvalidArgument
from hotswap.server.model.loader import LoadedModel

from .spec import Hyperparameters

TASK = "CAUSAL_LM"


def peft_config(method: str, hp: Hyperparameters, loaded: LoadedModel, task: str = TASK):
    """method: the adapter type (a classifier's classifier_adapter, with task "SEQ_CLS": PEFT then
    adds the score head to modules_to_save itself)."""
    if method in ("lora", "qlora"):
        targets = "all-linear" if hp.target_modules == ["all-linear"] else hp.target_modules
        return LoraConfig(task_type=task, r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout, target_modules=targets)
    if method == "prompt_tuning":
        if hp.virtual_tokens_init == "text" and hp.prompt_tuning_init_text:
            return PromptTuningConfig(task_type=task, num_virtual_tokens=hp.num_virtual_tokens, prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=hp.prompt_tuning_init_text, tokenizer_name_or_path=str(loaded.checkpoint_dir))
        return PromptTuningConfig(task_type=task, num_virtual_tokens=hp.num_virtual_tokens)
    if method == "p_tuning":
        return PromptEncoderConfig(task_type=task, num_virtual_tokens=hp.num_virtual_tokens, encoder_hidden_size=loaded.model.config.hidden_size)
    return PrefixTuningConfig(task_type=task, num_virtual_tokens=hp.num_virtual_tokens)


def wrap(model, config) -> PeftModel:
    """get_peft_model, with PEFT's refusal of dropout on parameter targets said in the job's terms: PEFT
    >= 0.22 turns MLP names and "all-linear" into LoRA on an MoE model's fused experts and router
    (lora.ParamWrapper), which cannot apply dropout."""
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        if "ParamWrapper does not work with lora_dropout" in str(e):
            raise InvalidArgument(f"these target_modules reach this MoE model's fused experts or router, whose LoRA PEFT trains without "
                                  f"dropout: set lora_dropout to 0 (it is {config.lora_dropout}), or target only linear layers",
                                  field="hyperparameters.lora_dropout") from e
        raise


def init_text(answers: list[str], tokenizer, tokens: int) -> str:
    """Prompt tuning's automatic init text: the training answers, distinct ones in order,
    joined until they cover the virtual tokens (PEFT repeats or cuts the text to fit)."""
    out, seen, n = [], set(), 0
    for a in answers:
        a = a.strip()
        if a and a not in seen:
            seen.add(a)
            out.append(a)
            n += len(tokenizer(a, add_special_tokens=False)["input_ids"])
            if n >= tokens:
                break
    return " ".join(out)


def text_ids(tokenizer, text: str, tokens: int) -> list[int]:
    """The text's tokens cut or repeated to exactly `tokens` (as PEFT's TEXT init does)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    return (ids * math.ceil(tokens / len(ids)))[:tokens]


@torch.no_grad()
def init_prefix_from_text(model, tokenizer, text: str) -> None:
    """Prefix tuning starts from the base's own keys and values for the text, as if the text
    preceded every prompt (Li & Liang 2021, §7.2: initialising with real words' activations
    trains better than random). PEFT's default init is N(0, 1), far from any real key/value."""
    cfg = model.peft_config[model.active_adapter]
    weight = model.prompt_encoder[model.active_adapter].embedding.weight  # [nv, layers * 2 * heads * head_dim]
    ids = torch.tensor([text_ids(tokenizer, text, cfg.num_virtual_tokens)], device=weight.device)
    cache = model.get_base_model()(input_ids=ids, use_cache=True).past_key_values
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])  # [layers, 2, heads, nv, head_dim]
    weight.copy_(kv.permute(3, 0, 1, 2, 4).reshape(weight.shape).to(weight.dtype))  # PEFT's get_prompt inverts this


def init_prompt_encoder_from_text(model, tokenizer, text: str, steps: int = 300) -> None:
    """P-tuning's encoder is an MLP over free embeddings, so it cannot simply be set to a
    text. Fit it instead, briefly, so that it starts by emitting the text's token
    embeddings — where prompt tuning's TEXT init starts (a few hundred Adam steps on the
    small encoder alone; well under a second here)."""
    cfg = model.peft_config[model.active_adapter]
    encoder = model.prompt_encoder[model.active_adapter]
    ids = torch.tensor(text_ids(tokenizer, text, cfg.num_virtual_tokens), device=encoder.embedding.weight.device)
    target = model.get_input_embeddings()(ids).detach().float()  # [nv, hidden]
    with torch.no_grad():
        encoder.embedding.weight.copy_(target.to(encoder.embedding.weight.dtype))
    index = torch.arange(cfg.num_virtual_tokens, device=ids.device)
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(encoder(index).float(), target)
        loss.backward()
        opt.step()
