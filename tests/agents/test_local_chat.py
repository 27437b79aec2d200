"""agents.loop.local_chat: the prompt is `with_tools` rendered by the chat template, greedy replies
equal inference.generate on that prompt, a batch equals each conversation alone (also through
run_agents vs run_agent), and generated text is cut at the end of turn and parsed into tool calls."""

import json

import pytest

from agents.calls import with_tools
from agents.loop import local_chat, run_agent, run_agents
from agents.tools import ToolRegistry, calculator
from data import tool_calls
from data.chat import render
from data.tokenizer import load_tokenizer
from inference.generate import generate
from models.gpt import GPT, llama_config
from models.random_params import random_params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    train, _ = tool_calls.questions(tool_calls.ToolCallsConfig(num_train=20, num_eval=4))
    directory = str(tmp_path_factory.mktemp("agent_tok"))
    tokenizer = tool_calls.train_tokenizer(tool_calls.records(train), directory)
    tokenizer = load_tokenizer(directory)
    cfg = llama_config(vocab_size=tokenizer.vocab_size, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       d_ff=48, max_len=320)
    model = GPT(cfg)
    return model, random_params(model, seed=1, scale=3.0), tokenizer


CONVERSATIONS = [[{"role": "user", "content": "What is 12 * 34?"}],
                 [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Compute 7 + 5."}]]


def test_reply_is_generate_on_the_rendered_prompt_and_batch_equals_alone(setup):
    model, params, tokenizer = setup
    chat = local_chat(model, params, tokenizer, max_new_tokens=6)
    tools = [calculator().openai()]
    batch = chat.batch(CONVERSATIONS, tools)
    for messages, reply in zip(CONVERSATIONS, batch):
        ids, _ = render(tokenizer, with_tools(messages, tools), add_generation_prompt=True, template="chatml")
        assert chat.prompt_ids(messages, tools) == ids
        out = generate(model, params, [ids], max_new_tokens=6, stop_tokens=chat.stop_tokens)[0]
        text = tokenizer.decode([t for t in out if t not in chat.stop_tokens])
        assert reply["content"] == text.split("<|im_end|>")[0].strip() or reply["tool_calls"]
        assert chat(messages, tools) == reply
    assert chat.stop_tokens == (tokenizer.encode("<|im_end|>")[0],)
    registry = ToolRegistry([calculator()])
    together = run_agents(chat.batch, CONVERSATIONS, registry, max_steps=2)
    alone = [run_agent(chat, messages, registry, max_steps=2) for messages in CONVERSATIONS]
    strip = [{**t.to_dict(), "tool_calls": [{**c, "id": ""} for c in t.tool_calls]} for t in together + alone]
    assert strip[:2] == strip[2:]


def test_reply_is_cut_at_end_of_turn_and_parsed(setup):
    model, params, tokenizer = setup
    chat = local_chat(model, params, tokenizer)
    text = 'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * 34"}}\n</tool_call>'
    tokens = tokenizer.encode(text + "<|im_end|>\n<|im_start|>user\nignored")
    reply = chat._reply(tokens)
    assert reply["content"] == "Let me compute."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply["tool_calls"]] == [
        ("calculator", {"expression": "12 * 34"})]
    plain = chat._reply(tokenizer.encode("The answer is 408.") + [chat.stop_tokens[0]] + tokenizer.encode("junk"))
    assert plain == {"role": "assistant", "content": "The answer is 408.", "tool_calls": None}
