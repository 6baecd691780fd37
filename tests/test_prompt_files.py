"""Prompt files: plain text as before; JSON Lines (*.jsonl) with an optional input image per
prompt, paths relative to the file; a bad line stops with one line naming the file and the line;
image prompts compare, hash, pickle and torch.load (weights_only) with their image."""
from __future__ import annotations

import io
import json
import pickle
import re

import pytest
import torch

from dancegrpo_fast.prompts import ImagePrompt, PromptStream, load_prompts


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG not decoded by the parser")
    return path


def test_plain_text_files_are_unchanged(tmp_path):
    file = tmp_path / "p.txt"
    file.write_text("a red cat\n\n  a blue dog  \n{\"prompt\": \"not parsed: not a .jsonl file\"}\n")
    prompts = load_prompts(file)
    assert prompts == ["a red cat", "a blue dog", '{"prompt": "not parsed: not a .jsonl file"}']
    assert all(type(p) is str for p in prompts)


def test_jsonl_lines_with_and_without_images(tmp_path):
    (tmp_path / "data").mkdir()
    first = _image(tmp_path / "data" / "images" / "one.png")
    second = _image(tmp_path / "elsewhere" / "two.png")
    file = tmp_path / "data" / "prompts.JSONL"
    file.write_text("\n".join([
        json.dumps({"prompt": " a dancer spins ", "image": "images/one.png"}),
        "",
        json.dumps({"prompt": "a dancer spins", "image": str(second)}),  # absolute path
        json.dumps({"prompt": "text only"}),
    ]) + "\n")
    prompts = load_prompts(file)
    assert len(prompts) == 3
    assert isinstance(prompts[0], ImagePrompt) and prompts[0].image == str(first.resolve())
    assert prompts[0].text == "a dancer spins" and prompts[1].image == str(second.resolve())
    assert type(prompts[2]) is str and prompts[2] == "text only"
    # One caption, two images: different prompts (the embedding cache keys on them).
    assert prompts[0] != prompts[1] and hash(prompts[0]) != hash(prompts[1])
    assert prompts[0] == ImagePrompt("a dancer spins", str(first.resolve()))
    assert len({prompts[0], prompts[1], ImagePrompt("a dancer spins", str(first.resolve()))}) == 2
    # An image prompt never equals bare text, either way round (equal values hash equal).
    assert prompts[0] != "a dancer spins" and "a dancer spins" != prompts[0]
    assert not (prompts[0] == "a dancer spins")
    # Everything that treats prompts as text still can.
    assert str(prompts[0]) == "a dancer spins" and type(str(prompts[0])) is str
    assert json.dumps(prompts[:1]) == '["a dancer spins"]' and f"{prompts[0]}" == "a dancer spins"


def test_image_prompts_survive_pickle_and_weights_only_torch_load(tmp_path):
    prompt = ImagePrompt("a dancer spins", "/data/one.png")
    again = pickle.loads(pickle.dumps(prompt))
    assert isinstance(again, ImagePrompt) and again == prompt and again.image == "/data/one.png"
    buffer = io.BytesIO()
    torch.save({"prompts": [prompt, "plain"]}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["prompts"]
    assert loaded == [prompt, "plain"] and loaded[0].image == "/data/one.png"


def test_the_prompt_stream_hands_out_image_prompts(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps({"prompt": "x", "image": "a.png"}) + "\n" + json.dumps({"prompt": "x", "image": "b.png"}) + "\n")
    prompts = load_prompts(file)
    taken, positions = PromptStream(prompts, seed=0).take(4)
    assert positions.tolist() == [0, 1, 2, 3]
    assert sorted(p.image for p in taken[:2]) == sorted(p.image for p in taken[2:]) == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a cat", "image": "a.png"', r"not valid JSON"),
    ('["a cat", "a.png"]', r"expected a JSON object .* got list"),
    ('{"image": "a.png"}', r'"prompt" must be a non-empty string, got None'),
    ('{"prompt": "   ", "image": "a.png"}', r'"prompt" must be a non-empty string'),
    ('{"prompt": 3}', r'"prompt" must be a non-empty string, got 3'),
    ('{"prompt": "a cat", "img": "a.png"}', r"unknown key\(s\) \['img'\]; the keys are \['prompt', 'image'\]"),
    ('{"prompt": "a cat", "image": 7}', r'"image" must be a path'),
    ('{"prompt": "a cat", "image": "missing.png"}', r"image 'missing.png' does not exist \(looked for '.*missing.png'\)"),
])
def test_a_bad_line_names_the_file_and_the_line(tmp_path, line, message):
    _image(tmp_path / "a.png")
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps({"prompt": "a good line", "image": "a.png"}) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"^prompt_file '{re.escape(str(file))}' line 3: {message}") as error:
        load_prompts(file)
    assert "\n" not in str(error.value)


def test_empty_jsonl_and_the_field_name_in_errors(tmp_path):
    file = tmp_path / "held_out.jsonl"
    file.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"eval_prompt_file '.*held_out.jsonl' holds no prompts"):
        load_prompts(file, "eval_prompt_file")
    file.write_text("nope\n")
    with pytest.raises(ValueError, match=r"^eval_prompt_file '.*held_out.jsonl' line 1: not valid JSON"):
        load_prompts(file, "eval_prompt_file")
