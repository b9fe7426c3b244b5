"""Small shared builders for the tests (tiny models, random token datasets, Trainer arguments)."""

import torch
import transformers as tf


def tiny_llama(act="silu", layers=2, **kwargs):
    config = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            hidden_act=act, **kwargs)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config)


def token_dataset(n_blocks=64, block=16, seed=0):
    """Random token blocks as a torch-format ``datasets.Dataset`` (input_ids, labels), as hf_stochact.data builds."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(3, 97, (n_blocks, block), generator=g).tolist()
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks}).with_format("torch")


def training_args(out, **kwargs):
    defaults = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3,
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    dataloader_num_workers=0)
    defaults.update(kwargs)
    return tf.TrainingArguments(**defaults)


def eager_and_compiled_steps(model, ids, seed=11):
    """[(loss, grads)] of one training step run eagerly and under torch.compile(fullgraph=True), each from the same
    seed (with inductor's fallback_random both draw the same masks)."""

    def step(m):
        return m(input_ids=ids, labels=ids).loss

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        model.zero_grad()
        torch.manual_seed(seed)
        loss = fn(model)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    return results
