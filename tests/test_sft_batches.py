"""train.sft's own batch path reaching the loss: the trainer's loss on a batch that the program builds (packed
conversations, loss mask, segment ids, positions) equals a float64 cross-entropy over the assistant targets with
each conversation run through the model alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_chat import Llama2ByteTokenizer

from llama_jax.chat_format import Message, encode_dialog
from llama_jax.config import ModelConfig, OptimizerConfig, load_config
from llama_jax.model import Llama
from llama_jax.params import model_from_params, model_params
from llama_jax.sft_data import PackedSFTBatches
from llama_jax.sharding import make_mesh
from llama_jax.trainer import Trainer
from train.sft import sft_batch

MODEL = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=160, max_seq_len=256,
                    dtype="float32", remat_policy="none")
CONVERSATIONS = [
    [Message("user", "hi"), Message("assistant", "hello!")],
    [Message("system", "Be brief."), Message("user", "2+2?"), Message("assistant", "4")],
    [Message("user", "a"), Message("assistant", "b", train=False), Message("user", "c"), Message("assistant", "d")],
    [Message("user", "name a color"), Message("assistant", "blue")],
    [Message("user", "ok?"), Message("assistant", "yes")],
]


def alone_log_likelihood(model: Llama, tokens: list[int], trained: list[bool]) -> tuple[float, int]:
    """(Σ −log p over the trained targets, their count) of one conversation run through the model by itself."""
    logits = np.asarray(model(jnp.asarray([tokens], jnp.int32))[0], np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    targets = [i for i in range(1, len(tokens)) if trained[i]]
    return -sum(log_probs[i - 1, tokens[i]] for i in targets), len(targets)


def sharp_model() -> Llama:
    """A random model whose attention is far from uniform (larger q/k weights than the 0.02 initialisation), so that
    which keys a query sees and at which relative positions shows in the loss."""
    params = {name: np.asarray(value) for name, value in model_params(Llama(MODEL)).items()}
    for name in ("blocks.attention.w_q", "blocks.attention.w_k"):
        params[name] = params[name] * 25.0
    return model_from_params(MODEL, params)


def conversations_in(batch: dict[str, np.ndarray]) -> list[list[int]]:
    """Each packed conversation's tokens, rebuilt from its inputs and its last target."""
    found = []
    for inputs, targets, segments in zip(batch["inputs"], batch["targets"], batch["segment_ids"]):
        for segment in sorted(set(segments.tolist()) - {0}):
            where = np.flatnonzero(segments == segment)
            found.append(inputs[where].tolist() + [int(targets[where[-1]])])
    return found


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_sft_batch_loss_equals_each_conversation_scored_alone(mesh_shape):
    tokenizer = Llama2ByteTokenizer()
    dialogs = [encode_dialog(messages, tokenizer, "llama2", for_generation=False) for messages in CONVERSATIONS]
    config = load_config(None, ["train.batch_size=2", "train.seq_len=96"])
    batches = PackedSFTBatches(dialogs, config.train.seq_len, config.train.batch_size, pad_id=0, seed=0)
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    trainer = Trainer.create(MODEL, OptimizerConfig(), 10, make_mesh(*mesh_shape, devices=devices))
    model = sharp_model()
    params = jax.device_put(model_params(model), trainer.param_shardings())

    batch = sft_batch(trainer, batches, 0, config)
    loss_sum, weight_sum = trainer.eval_loss()(params, batch)

    packed = {key: np.asarray(jax.device_get(value)) for key, value in batch.items()}
    by_tokens = {tuple(dialog.tokens): dialog for dialog in dialogs}
    in_batch = conversations_in(packed)
    assert len(in_batch) >= 3  # several conversations share rows, so masking between them matters
    expected_sum, expected_count = 0.0, 0
    for tokens in in_batch:
        dialog = by_tokens[tuple(tokens)]  # a packed conversation is exactly one of the encoded ones
        nll, count = alone_log_likelihood(model, dialog.tokens, dialog.loss_mask)
        expected_sum, expected_count = expected_sum + nll, expected_count + count
    assert float(weight_sum) == expected_count
    assert float(loss_sum) == pytest.approx(expected_sum, rel=1e-5)
