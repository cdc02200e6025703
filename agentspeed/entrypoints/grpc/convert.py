"""TokenSpeedScheduler messages <-> the engine's types.

Every field of a GenerateRequest is either honoured or refused with INVALID_ARGUMENT naming
it (no field is silently ignored): multimodal inputs, disaggregated prefill, input logprobs,
logit_bias and structural tags are refused because this engine has none of them.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from smg_grpc_proto.generated import tokenspeed_scheduler_pb2 as pb

from agentspeed.control.plan import TokenLogprob
from agentspeed.entrypoints.errors import APIError
from agentspeed.entrypoints.openai.serving import make_params, token_budget
from agentspeed.sampling_params import SamplingParams, StructuredOutputs

if TYPE_CHECKING:
    from agentspeed.entrypoints.openai.serving import ServerState
    from agentspeed.tokenizer import Tokenizer


class InvalidRequest(ValueError):
    """The request cannot be served as sent (INVALID_ARGUMENT)."""


def _constraint(sp: pb.SamplingParams) -> StructuredOutputs | None:
    kind = sp.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "regex":
        return StructuredOutputs(regex=sp.regex)
    if kind == "json_schema":
        return StructuredOutputs(json=sp.json_schema)
    if kind == "ebnf_grammar":
        return StructuredOutputs(grammar=sp.ebnf_grammar)
    assert kind == "structural_tag", kind
    return StructuredOutputs(structural_tag=sp.structural_tag)


def _refuse_unsupported(req: pb.GenerateRequest) -> None:
    sp = req.sampling_params
    if req.HasField("mm_inputs") and len(req.mm_inputs.items):
        raise InvalidRequest("mm_inputs: this engine serves text-only models")
    if req.HasField("kv_bootstrap_info") or req.HasField("encode_bootstrap_info"):
        raise InvalidRequest("disaggregated prefill/encode (kv_bootstrap_info, encode_bootstrap_info) is not supported")
    if req.HasField("data_parallel_rank") and req.data_parallel_rank != 0:
        raise InvalidRequest(f"data_parallel_rank {req.data_parallel_rank}: this worker has one rank (0)")
    if req.return_logprob and req.HasField("logprob_start_len") and req.logprob_start_len >= 0:
        raise InvalidRequest("input (prompt) logprobs are not supported: leave logprob_start_len unset or -1")
    if len(req.token_ids_logprob):
        raise InvalidRequest("token_ids_logprob is not supported")
    if len(sp.logit_bias):
        raise InvalidRequest("sampling_params.logit_bias is not supported")
    if sp.HasField("custom_params") and len(sp.custom_params.fields):
        raise InvalidRequest(f"sampling_params.custom_params are not supported ({', '.join(sp.custom_params.fields)})")


def generate_inputs(req: pb.GenerateRequest, state: ServerState) -> tuple[list[int], SamplingParams]:
    """The prompt token ids and sampling parameters of a Generate request; raises
    InvalidRequest for what cannot be served."""
    _refuse_unsupported(req)
    ids = list(req.tokenized.input_ids)
    if not ids:
        raise InvalidRequest("tokenized.input_ids is empty")
    vocab = state.engine.info.vocab_size if state.engine.info is not None else 0
    if vocab and max(ids) >= vocab:
        raise InvalidRequest(f"tokenized.input_ids holds token id {max(ids)}, outside the vocabulary ({vocab})")
    sp = req.sampling_params
    try:
        max_tokens = token_budget(state, len(ids), sp.max_new_tokens if sp.HasField("max_new_tokens") else None,
                                  "tokenized.input_ids", "sampling_params.max_new_tokens")
        return ids, make_params(
            n=sp.n or 1, max_tokens=max_tokens, min_tokens=sp.min_new_tokens,
            temperature=sp.temperature if sp.HasField("temperature") else 1.0,
            top_p=sp.top_p if sp.HasField("top_p") else 1.0,
            top_k=max(sp.top_k, 0) if sp.HasField("top_k") else 0,
            min_p=sp.min_p if sp.HasField("min_p") else 0.0,
            frequency_penalty=sp.frequency_penalty if sp.HasField("frequency_penalty") else 0.0,
            presence_penalty=sp.presence_penalty if sp.HasField("presence_penalty") else 0.0,
            repetition_penalty=sp.repetition_penalty if sp.HasField("repetition_penalty") else 1.0,
            stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids), ignore_eos=sp.ignore_eos,
            # The gateway detokenizes; the engine's text is only used to find stop strings.
            skip_special_tokens=sp.skip_special_tokens,
            seed=sp.sampling_seed if sp.HasField("sampling_seed") else None,
            logprobs=max(req.top_logprobs_num, 0) if req.return_logprob else None,
            structured_outputs=_constraint(sp))
    except APIError as e:
        raise InvalidRequest(e.message) from None


def output_logprobs(lps: Sequence[TokenLogprob]) -> pb.OutputLogProbs:
    return pb.OutputLogProbs(
        token_logprobs=[lp.logprob for lp in lps], token_ids=[lp.token_id for lp in lps],
        top_logprobs=[pb.TopLogProbs(values=[v for _, v in lp.top], token_ids=[t for t, _ in lp.top]) for lp in lps])


def tokenizer_zip(tok: Tokenizer) -> bytes:
    """The tokenizer as files (tokenizer.json, tokenizer_config.json with the chat template,
    ...) in one zip: what GetTokenizer streams, also for a model that is only a GGUF file."""
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="agentspeed-tok-") as tmp:
        tok.hf.save_pretrained(tmp)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(Path(tmp).rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(tmp).as_posix())
    return buf.getvalue()
