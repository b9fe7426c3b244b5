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


def write_tiny_llama_gguf(path, vocab=64, d=32, d_ff=64, layers=2, heads=4, kv=2, seed=0):
    """A real (float32) llama GGUF file with a byte-level BPE vocabulary; returns the token embedding written."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(d // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<s>", "</s>"] + [chr(97 + i % 26) * (1 + i // 26) for i in range(vocab - 2)])
    w.add_token_types([3, 3] + [1] * (vocab - 2))
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    embedding = t(vocab, d)
    ones = np.ones(d, np.float32)
    w.add_tensor("token_embd.weight", embedding)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", t(vocab, d))
    for i in range(layers):
        for name, array in (("attn_norm", ones), ("ffn_norm", ones), ("attn_q", t(d, d)),
                            ("attn_k", t(kv * d // heads, d)), ("attn_v", t(kv * d // heads, d)),
                            ("attn_output", t(d, d)), ("ffn_gate", t(d_ff, d)), ("ffn_up", t(d_ff, d)),
                            ("ffn_down", t(d, d_ff))):
            w.add_tensor(f"blk.{i}.{name}.weight", array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return torch.from_numpy(embedding)
