"""The API prompt model: parsing, links, constants, round trip, and reading workflow files and PNGs."""
from __future__ import annotations

import json
import struct
import zlib

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import engine.workflow
from engine.workflow import BadLink, Link, PromptFormatError, load_prompt_file, parse_prompt, png_text_chunks


def test_inputs_parse_into_links_bad_links_and_constants():
    workflow = parse_prompt({"3": {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": 7, "bad": ["4"], "negative_index": ["4", -1], "as_bool": ["4", True],
        "values": {"__value__": [1, 2]}, "numeric": [4, 1]}}})
    inputs = workflow["3"].inputs
    assert inputs == {"model": Link("4", 0), "seed": 7, "bad": BadLink(["4"]), "negative_index": BadLink(["4", -1]),
                      "as_bool": BadLink(["4", True]), "values": [1, 2], "numeric": Link("4", 1)}
    assert dict(workflow["3"].links()) == {"model": Link("4", 0), "numeric": Link("4", 1)}
    assert workflow["3"].constants() == {"seed": 7, "values": [1, 2]}


def test_to_api_round_trips_and_wraps_constant_lists():
    raw = {"12:3": {"class_type": "Concat", "inputs": {"a": ["4", 0], "b": {"__value__": ["x", 1]}},
                    "_meta": {"title": "joined"}},
           "4": {"class_type": "Pick", "inputs": {"letter": "a"}}}
    assert parse_prompt(raw).to_api() == raw


def test_missing_inputs_key_means_no_inputs():
    assert parse_prompt({"1": {"class_type": "Sink"}})["1"].inputs == {}


def test_structural_problems_are_all_listed():
    with pytest.raises(PromptFormatError) as caught:
        parse_prompt({"1": {"inputs": {}}, "2": {"class_type": ""}, "3": {"class_type": "A", "_meta": {"title": 5}}})
    assert caught.value.problems == ["2/class_type: '' should be non-empty", "3/_meta/title: 5 is not of type 'string'",
                                     "node '1': missing 'class_type'"]


def test_load_prompt_file_accepts_a_post_prompt_body(tmp_path):
    body = {"prompt": {"1": {"class_type": "Sink", "inputs": {}}}, "client_id": "abc"}
    (tmp_path / "body.json").write_text(json.dumps(body))
    assert load_prompt_file(tmp_path / "body.json") == body["prompt"]


def test_load_prompt_file_keeps_a_node_whose_id_is_prompt(tmp_path):
    raw = {"prompt": {"class_type": "Sink", "inputs": {}}}
    (tmp_path / "wf.json").write_text(json.dumps(raw))
    assert load_prompt_file(tmp_path / "wf.json") == raw


def test_load_prompt_file_reads_a_json_file_that_starts_with_a_byte_order_mark(tmp_path):
    prompt = {"1": {"class_type": "Sink", "inputs": {}}}
    # Windows editors (Notepad, PowerShell's Out-File) save UTF-8 with a BOM; json.loads refuses one.
    (tmp_path / "wf.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(prompt).encode())
    assert load_prompt_file(tmp_path / "wf.json") == prompt


def test_load_prompt_file_names_a_missing_file(tmp_path):
    with pytest.raises(PromptFormatError, match="cannot read"):
        load_prompt_file(tmp_path / "absent.json")


def test_png_text_chunks_reads_text_ztxt_and_itxt(tmp_path):
    info = PngInfo()
    info.add_text("prompt", '{"1": {}}')
    info.add_text("workflow", '{"a": 1}', zip=True)
    info.add_itxt("title", "ünïcode ✓", zip=False)
    info.add_itxt("packed", "ünïcode ✓" * 10, zip=True)
    Image.new("L", (2, 2)).save(tmp_path / "x.png", pnginfo=info)
    assert png_text_chunks((tmp_path / "x.png").read_bytes()) == {
        "prompt": '{"1": {}}', "workflow": '{"a": 1}', "title": "ünïcode ✓", "packed": "ünïcode ✓" * 10}


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_compressed_text_chunk_that_inflates_past_the_limit_is_refused(monkeypatch):
    # A shared PNG must not be able to exhaust memory with a small zTXt chunk that inflates enormously.
    monkeypatch.setattr(engine.workflow, "MAX_TEXT_CHUNK_BYTES", 1000)
    bomb = png_chunk(b"zTXt", b"prompt\x00\x00" + zlib.compress(b"x" * 1001))
    fits = png_chunk(b"zTXt", b"prompt\x00\x00" + zlib.compress(b"x" * 1000))
    with pytest.raises(ValueError, match="zTXt chunk 'prompt' inflates to more than 1000 bytes"):
        png_text_chunks(engine.workflow.PNG_SIGNATURE + bomb)
    assert png_text_chunks(engine.workflow.PNG_SIGNATURE + fits) == {"prompt": "x" * 1000}
