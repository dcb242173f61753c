"""chat's models: every local model as one LangChain chat model (standard tests, streaming, usage,
stop strings, token inspector) over our GPT or transformers (LoRA adapters included), checked
against transformers' and peft's own `generate`; the spec factory."""

from __future__ import annotations

import copy

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_tests.unit_tests import ChatModelUnitTests

from chat.local_model import ChatLocalModel, load_local_model, prompt_ids
from chat.providers import ModelSpecError, load_chat_model
from core.lm.chat_format import stop_ids
from core.lm.generate import PromptTooLongError, generate
from core.lm.loader import resolve_model_path
from core.lm.sampling import SamplingParams

STORY = "Once upon a time, there was a little rabbit named Ben."  # the base model runs on


class TestChatLocalModelStandard(ChatModelUnitTests):
    """LangChain's standard unit tests. Tool calling and structured output do not apply (the
    tutor has no tool format); the suite itself skips or no-ops those for models without
    `bind_tools`, and skips serialisation for models that are not `lc_serializable`."""

    @property
    def chat_model_class(self) -> type[ChatLocalModel]:
        return ChatLocalModel

    @property
    def chat_model_params(self) -> dict:
        return {"model": "tutor-base"}


@pytest.fixture(scope="module")
def tutor():
    return ChatLocalModel(model="tutor-base", temperature=0.9, seed=0)


def test_stream_joins_to_invoke_for_the_same_seed(tutor):
    chunks = list(tutor.stream(STORY))
    texts = [c.content for c in chunks if c.content]
    assert len(texts) >= 5  # it really streams, token by token
    answer = tutor.invoke(STORY)
    assert "".join(texts) == answer.content
    assert answer.content.strip()
    # A different seed samples a different answer (so the seed really is used).
    assert tutor.invoke(STORY, seed=1).content != answer.content


def test_usage_metadata_is_on_the_last_chunk_and_counts_tokens(tutor):
    _, tokenizer = load_local_model("tutor-base")
    chunks = list(tutor.stream(STORY, top_alternatives=1))
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1
    last = chunks[-1]
    assert last.chunk_position == "last"
    usage = last.usage_metadata
    assert usage["input_tokens"] == len(prompt_ids(tokenizer, [HumanMessage(STORY)]))
    generated = sum(len(c.response_metadata.get("tokens", [])) for c in chunks)
    assert usage["output_tokens"] == generated > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert last.response_metadata["finish_reason"] in ("stop", "length")


def test_greedy_answer_equals_core_generate_and_transformers():
    """Temperature 0 through LangChain = core's own greedy decoding = transformers' greedy
    `generate` on the same folder."""
    from transformers import AutoModelForCausalLM

    gpt, tokenizer = load_local_model("tutor-base")
    messages = [SystemMessage("You are a kind tutor."), HumanMessage(STORY)]
    ours = ChatLocalModel(model="tutor-base", temperature=0, max_tokens=40).invoke(messages)
    ids = prompt_ids(tokenizer, messages)
    reference = generate(
        gpt,
        ids,
        stop_ids=stop_ids(tokenizer),
        sampling=SamplingParams(max_tokens=40, temperature=0),
    )
    assert ours.content == tokenizer.decode(reference, skip_special_tokens=True)
    hf = AutoModelForCausalLM.from_pretrained(resolve_model_path("tutor-base"), dtype=torch.float32)
    out = hf.generate(
        input_ids=torch.tensor([ids]),
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    assert tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True) == ours.content


def test_stop_strings_cut_the_answer_before_the_stop_sequence(tutor):
    full = tutor.invoke(STORY).content
    word = full.split()[3]
    cut = tutor.invoke(STORY, stop=[word])
    assert cut.content == full[: full.index(word)]
    streamed = "".join(c.content for c in tutor.stream(STORY, stop=[word]))
    assert streamed == cut.content
    # A model-level stop list works the same way.
    assert (
        ChatLocalModel(model="tutor-base", temperature=0.9, seed=0, stop=[word])
        .invoke(STORY)
        .content
        == cut.content
    )


def test_token_inspector_gives_probabilities_and_alternatives(tutor):
    answer = tutor.invoke(STORY, top_alternatives=5)
    tokens = answer.response_metadata["tokens"]
    _, tokenizer = load_local_model("tutor-base")
    assert tokenizer.decode([t["token_id"] for t in tokens]) == answer.content
    assert len(tokens) == answer.usage_metadata["output_tokens"]
    for t in tokens:
        probs = [a["probability"] for a in t["alternatives"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
        assert 0 < t["probability"] <= 1 and sum(probs) <= 1 + 1e-5
        top = {a["token_id"]: a["probability"] for a in t["alternatives"]}
        if t["token_id"] in top:  # the chosen token, when among the top 5, has the same number
            assert top[t["token_id"]] == pytest.approx(t["probability"])
    # Without the option, no per-token data is attached.
    assert "tokens" not in tutor.invoke(STORY).response_metadata


def test_sampling_options_reach_the_sampler(tutor):
    greedy = tutor.invoke(STORY, temperature=0).content
    assert tutor.invoke(STORY, top_k=1).content == greedy  # top-1 is greedy, whatever the seed
    assert tutor.invoke(STORY, top_p=1e-6, seed=5).content == greedy
    short = tutor.invoke(STORY, max_tokens=3)
    assert short.usage_metadata["output_tokens"] == 3
    assert short.response_metadata["finish_reason"] == "length"


def test_bad_input_is_a_clear_error(tutor):
    with pytest.raises(ValueError, match="ToolMessage is not supported"):
        tutor.invoke([HumanMessage("hi"), ToolMessage("42", tool_call_id="1")])
    with pytest.raises(ValueError, match="unsupported option"):
        tutor.invoke("hi", temprature=0.5)
    with pytest.raises(PromptTooLongError, match="context is 128 tokens"):
        tutor.invoke("The cat sat on the mat. " * 40)
    with pytest.raises(ValueError, match="temperature"):
        tutor.invoke("hi", temperature=-1)
    # The conversation parts it does read: system, user and assistant turns.
    assert isinstance(
        tutor.invoke([HumanMessage("hi"), AIMessage("hello"), HumanMessage("ok")]), AIMessage
    )


def test_lora_adapter_chats_and_matches_peft_generate(lora_adapter):
    from peft import PeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sampling = SamplingParams(temperature=0, max_tokens=30)
    backend = load_chat_model(f"tutor-base+{lora_adapter}", sampling)
    assert backend.kind == "transformers" and backend.token_inspector
    answer = backend.chat_model.invoke(STORY).content
    # Reference: peft + transformers' greedy generate, by hand.
    folder = resolve_model_path("tutor-base")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    model = PeftModelForCausalLM.from_pretrained(model, str(lora_adapter)).eval()
    ids = torch.tensor([prompt_ids(tokenizer, [HumanMessage(STORY)])])
    out = model.generate(
        input_ids=ids,
        max_new_tokens=30,
        do_sample=False,
        eos_token_id=stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    assert answer == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    base = ChatLocalModel(model="tutor-base", temperature=0, max_tokens=30).invoke(STORY).content
    assert answer != base  # the adapter is really applied
    # An adapter folder alone finds its base in adapter_config.json.
    alone = load_chat_model(str(lora_adapter), sampling)
    assert alone.chat_model.invoke(STORY).content == answer


def test_the_adapter_folders_own_tokenizer_wins(tmp_path, lora_adapter):
    """`genai-lab finetune` saves the tokenizer (with the chat template it trained with) beside
    the adapter; that template, not the base model's, renders the prompt."""
    import shutil

    folder = shutil.copytree(lora_adapter, tmp_path / "with-tokenizer")
    _, tokenizer = load_local_model("tutor-base")
    own = copy.deepcopy(tokenizer)
    own.chat_template = (
        "{% for m in messages %}<|user|>\nQuestion: {{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    own.save_pretrained(folder)
    backend = load_chat_model(str(folder), SamplingParams(temperature=0, max_tokens=5))
    hi = [HumanMessage("hi")]
    assert backend.count_tokens(hi) == len(prompt_ids(own, hi)) > len(prompt_ids(tokenizer, hi))


def test_non_llama_folder_goes_through_transformers(tmp_path):
    """A GPT-2 folder (core reads Llama only) runs through transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = load_local_model("tutor-base")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=96, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    backend = load_chat_model(str(tmp_path), SamplingParams(temperature=0, max_tokens=8))
    assert backend.kind == "transformers" and backend.context_window == 96
    reply = backend.chat_model.invoke("hello")
    assert isinstance(reply.content, str)
    assert backend.count_tokens([HumanMessage("hello")]) == len(
        prompt_ids(tokenizer, [HumanMessage("hello")])
    )


def test_core_specs_resolve_to_our_gpt():
    backend = load_chat_model("tutor")
    assert backend.kind == "core" and backend.token_inspector
    assert backend.context_window == 128
    folder = load_chat_model(str(resolve_model_path("tutor-base")))
    assert folder.kind == "core"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty model spec"),
        ("tutr", "unknown model 'tutr'"),
        ("no/such/folder", "unknown model"),
        ("nosuchprovider:model", "not a LangChain provider"),
        ("openai:", "no model name"),
        ("tutor-base+/no/adapter", "not a LoRA adapter folder"),
    ],
)
def test_bad_model_specs_are_one_line_errors(spec, message):
    with pytest.raises(ModelSpecError, match=message) as info:
        load_chat_model(spec)
    assert "\n" not in str(info.value)


def test_hosted_provider_without_package_or_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ModelSpecError) as info:
        load_chat_model("openai:gpt-4o-mini")
    text = str(info.value)
    assert "pip install langchain-openai" in text and "OPENAI_API_KEY" in text
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with pytest.raises(ModelSpecError) as info:
        load_chat_model("openai:gpt-4o-mini")
    assert "langchain-openai" in str(info.value) and "OPENAI_API_KEY" not in str(info.value)
    with pytest.raises(ModelSpecError, match="seed works with local models only"):
        load_chat_model("openai:gpt-4o-mini", SamplingParams(seed=1))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": -1}, "temperature must be"),
        ({"top_p": 0}, "top_p must be"),
        ({"top_k": -3}, "top_k must be"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty must be a number > 0"),
        ({"seed": 2**64}, "seed must be an integer from 0"),
    ],
)
def test_bad_sampling_settings_fail_before_loading(settings, message):
    """SamplingParams checks its values when made: a bad one never reaches a model."""
    with pytest.raises(ValueError, match=message):
        SamplingParams(**settings)
    # a chat model's fields: pydantic checks max_tokens when made, SamplingParams the rest at
    # the first call (a model is loaded only after that)
    field_message = "greater than or equal to 1" if "max_tokens" in settings else message
    with pytest.raises(ValueError, match=field_message):
        ChatLocalModel(model="tutor-base", **settings).invoke("hi")


def test_a_real_conversation_longer_than_the_context_keeps_working(tmp_path):
    """The tutor reads 128 tokens; ten turns are far more. Every turn is answered, older turns
    are left out of the prompt, and all of them stay in the saved conversation."""
    from chat.conversations import ChatStore
    from chat.session import ChatSession

    store = ChatStore(tmp_path / "chat.sqlite")
    backend = load_chat_model("tutor-base", SamplingParams(temperature=0.8, seed=0))
    session = ChatSession(store, backend, thread_id="long")
    for i in range(10):
        result = session.ask(f"Question {i}: how do tokens, sampling and LoRA fit together?")
        assert result.usage["input_tokens"] + 1 <= backend.context_window
    assert result.dropped_messages >= 12
    assert len(session.history()) == 20
    store.close()
