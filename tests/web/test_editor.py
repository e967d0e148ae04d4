"""The editor as a user meets it, in headless Chromium against a real server with toy node types."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from editor_page import (add_node, api_prompt, connect, drop_file, drop_json, expect, graph_nodes, handle, into_output,
                         node, screenshot, ui_workflow)


def test_first_open_without_the_sd_nodes_shows_a_note_naming_them(editor) -> None:
    expect(editor.locator(".react-flow__node")).to_have_count(1)
    (note,) = graph_nodes(editor)
    assert note["classType"] == "Note" and "CheckpointLoaderSimple" in note["values"]["text"]
    expect(editor.locator(node(note["id"]))).to_contain_text("Note")
    screenshot(editor, "first-open")


def test_build_a_workflow_from_the_palette_queue_it_and_see_progress_preview_and_result(editor) -> None:
    solid = add_node(editor, "solid image", (300, 200))
    slow = add_node(editor, "slowbrighten", (300, 600))
    show = add_node(editor, "show image", (900, 300))
    connect(editor, solid, 0, slow, "image")
    connect(editor, slow, 0, show, "image")
    expect(editor.locator(".react-flow__edge")).to_have_count(2)
    connect(editor, solid, 0, slow, "steps")  # IMAGE into an INT widget's socket is refused
    expect(editor.locator(".react-flow__edge")).to_have_count(2)

    editor.get_by_test_id(f"w-{slow}-steps").click()
    editor.get_by_test_id(f"w-{slow}-steps").fill("6")
    editor.get_by_test_id(f"w-{solid}-colour").select_option("blue")
    editor.get_by_test_id(f"w-{solid}-seed").fill("7")
    editor.get_by_test_id(f"w-{solid}-seed-control").select_option("increment")
    editor.get_by_test_id(f"w-{show}-filename_prefix").fill("e2e")
    screenshot(editor, "built-from-palette")

    editor.get_by_test_id("queue").click()
    expect(editor.get_by_test_id("status")).to_have_text("done", timeout=30_000)
    expect(editor.get_by_test_id(f"progress-{slow}")).to_have_attribute("title", "6 / 6")
    expect(editor.locator(f'{node(slow)} [data-testid="preview"]')).to_be_visible()
    result = editor.get_by_test_id(f"result-{show}")
    expect(result).to_be_visible()
    editor.wait_for_function("img => img.complete && img.naturalWidth === 32", arg=result.element_handle())
    assert editor.get_by_test_id(f"w-{solid}-seed").input_value() == "8"  # incremented after the queue
    screenshot(editor, "result-shown")

    history = editor.evaluate("fetch('/history').then(r => r.json())")
    (entry,) = history.values()
    sent = entry["prompt"][2]
    assert sent[slow]["inputs"] == {"steps": 6, "image": [solid, 0]}
    assert sent[solid]["inputs"] == {"colour": "blue", "size": 32, "seed": 7}
    assert entry["prompt"][3]["extra_pnginfo"]["workflow"]["nodes"]


def test_a_reload_restores_the_workflow_from_local_storage(editor) -> None:
    constant = add_node(editor, "integer constant", (400, 300))
    editor.get_by_test_id(f"w-{constant}-value").fill("42")
    editor.get_by_test_id(f"w-{constant}-value").blur()
    editor.wait_for_function("() => (localStorage.getItem('sdgraph.workflows') || '').includes('42')")
    def kept(nodes: list[dict]) -> list[tuple]:
        return [(n["id"], n["classType"], n["pos"], n["values"], n["mode"]) for n in nodes]

    before = kept(graph_nodes(editor))
    editor.reload()
    editor.wait_for_selector(f'{node(constant)}')
    assert kept(graph_nodes(editor)) == before
    assert editor.get_by_test_id(f"w-{constant}-value").input_value() == "42"


def test_undo_and_redo_an_added_node_and_a_widget_edit(editor) -> None:
    added = add_node(editor, "integer constant", (400, 300))
    field = editor.get_by_test_id(f"w-{added}-value")
    field.fill("5")
    field.blur()
    editor.locator(".react-flow__pane").click(position={"x": 50, "y": 700})
    editor.keyboard.press("Control+z")
    expect(field).to_have_value("0")
    editor.keyboard.press("Control+z")
    expect(editor.locator(".react-flow__node")).to_have_count(1)
    editor.keyboard.press("Control+Shift+z")
    expect(editor.locator(".react-flow__node")).to_have_count(2)
    editor.keyboard.press("Control+Shift+z")
    expect(editor.get_by_test_id(f"w-{added}-value")).to_have_value("5")


def test_a_dropped_ui_workflow_json_replaces_the_graph(editor) -> None:
    drop_json(editor, into_output(3, "Constant", [12], 8, title="Shown"), "two.json")
    expect(editor.locator(".react-flow__node")).to_have_count(2)
    expect(editor.locator(".react-flow__edge")).to_have_count(1)
    expect(editor.get_by_test_id("title-8")).to_have_text("Shown")
    assert api_prompt(editor) == {
        "3": {"class_type": "Constant", "inputs": {"value": 12}, "_meta": {"title": "Integer constant"}},
        "8": {"class_type": "Output", "inputs": {"value": ["3", 0]}, "_meta": {"title": "Shown"}}}


def test_a_dropped_png_opens_its_embedded_workflow(editor) -> None:
    workflow = ui_workflow([{"id": 1, "type": "Pick", "widgets_values": ["c"]}], [])
    info = PngInfo()
    info.add_text("workflow", json.dumps(workflow))
    info.add_text("prompt", json.dumps({"1": {"class_type": "Pick", "inputs": {"letter": "b"}}}))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 0)).save(buffer, format="PNG", pnginfo=info)
    drop_file(editor, buffer.getvalue(), "made.png", "image/png")
    expect(editor.get_by_test_id("w-1-letter")).to_have_value("c")
    expect(editor.get_by_test_id("tab").first).to_contain_text("made")
    screenshot(editor, "png-dropped")


def test_a_dropped_api_prompt_opens_laid_out_in_columns(editor) -> None:
    drop_json(editor, {"5": {"class_type": "Constant", "inputs": {"value": 3}},
                     "6": {"class_type": "Output", "inputs": {"value": ["5", 0]}}}, "api.json")
    expect(editor.locator(".react-flow__edge")).to_have_count(1)
    positions = {n["id"]: n["pos"] for n in graph_nodes(editor)}
    assert positions["5"][0] < positions["6"][0]


def test_a_validation_error_is_shown_on_the_node_and_input_it_names(editor) -> None:
    editor.expected_errors.append(r"status of 400 .*/prompt$")  # the browser logs the server's refusal
    drop_json(editor, into_output(4, "Constant", [5000], 9))
    editor.keyboard.press("Control+Enter")
    expect(editor.get_by_test_id("status")).to_have_text("invalid")
    expect(editor.locator(node("4") + " .sd-node")).to_have_class(re.compile(r"\berror\b"))
    expect(editor.get_by_test_id("input-4-value")).to_have_class(re.compile(r"input-error"))
    expect(editor.get_by_test_id("input-4-value")).to_contain_text("1000")
    expect(editor.locator(node("9") + " .sd-node")).not_to_have_class(re.compile(r"\berror\b"))
    screenshot(editor, "validation-error")


def test_an_execution_error_marks_the_node_and_opens_a_dialog(editor) -> None:
    drop_json(editor, into_output(2, "Fail", [1, "it broke"], 3))
    editor.get_by_test_id("queue").click()
    expect(editor.get_by_test_id("error-dialog")).to_contain_text("it broke", timeout=20_000)
    expect(editor.get_by_test_id("status")).to_have_text("failed")
    expect(editor.locator(node("2") + " .sd-node")).to_have_class(re.compile(r"\berror\b"))


def test_dropping_a_link_on_the_canvas_offers_nodes_that_take_its_type(editor) -> None:
    constant = add_node(editor, "integer constant", (300, 300))
    source = editor.locator(handle(constant, "out:0"))
    box = source.bounding_box()
    editor.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    editor.mouse.down()
    editor.mouse.move(900, 650, steps=8)
    editor.mouse.up()
    expect(editor.get_by_test_id("palette")).to_be_visible()
    expect(editor.get_by_test_id("palette-item-ToText")).to_be_visible()
    expect(editor.get_by_test_id("palette-item-Pick")).to_have_count(0)  # takes no INT
    editor.get_by_test_id("palette").fill("totext")
    editor.keyboard.press("Enter")
    expect(editor.locator(".react-flow__edge")).to_have_count(1)
    (link,) = editor.evaluate("window.sdgraph.links()")
    assert (link["source"], link["targetInput"]) == (constant, "value")


def test_mute_bypass_copy_paste_and_groups_from_the_keyboard(editor) -> None:
    constant = add_node(editor, "integer constant", (300, 300))
    editor.locator(node(constant) + " .sd-title").click()
    editor.keyboard.press("Control+m")
    expect(editor.locator(node(constant) + " .sd-node")).to_have_class(re.compile(r"\bmuted\b"))
    assert constant not in api_prompt(editor)
    editor.keyboard.press("Control+m")
    editor.keyboard.press("Control+b")
    expect(editor.locator(node(constant) + " .sd-node")).to_have_class(re.compile(r"\bbypassed\b"))
    editor.keyboard.press("Control+c")
    editor.keyboard.press("Control+v")
    expect(editor.locator(".react-flow__node-sd")).to_have_count(3)
    editor.keyboard.press("Control+a")
    editor.keyboard.press("Control+g")
    expect(editor.get_by_test_id("group-0")).to_be_visible()
    before = {n["id"]: n["pos"] for n in graph_nodes(editor)}
    title = editor.locator(".sd-group-title").bounding_box()
    editor.mouse.move(title["x"] + 20, title["y"] + 10)
    editor.mouse.down()
    editor.mouse.move(title["x"] + 120, title["y"] + 60, steps=5)
    editor.mouse.up()
    after = {n["id"]: n["pos"] for n in graph_nodes(editor)}
    shifts = {(after[i][0] - before[i][0], after[i][1] - before[i][1]) for i in before}
    assert len(shifts) == 1 and shifts != {(0, 0)}  # every node in the group moved with it, by the same amount
    editor.keyboard.press("Control+a")
    editor.keyboard.press("Delete")
    expect(editor.locator(".react-flow__node-sd")).to_have_count(0)


def test_the_queue_panel_lists_past_prompts_and_opens_one_in_a_new_tab(editor) -> None:
    drop_json(editor, into_output(1, "Constant", [77], 2), "past.json")
    editor.get_by_test_id("queue").click()
    expect(editor.get_by_test_id("status")).to_have_text("done", timeout=20_000)
    editor.get_by_test_id("toggle-queue").click()
    item = editor.get_by_test_id("history-item").first
    expect(item).to_contain_text("done")
    item.click()
    expect(editor.get_by_test_id("tab")).to_have_count(2)
    expect(editor.get_by_test_id("w-1-value")).to_have_value("77")
    screenshot(editor, "queue-panel")


def test_an_uploaded_image_is_chosen_and_runs_to_the_result(editor) -> None:
    loader = add_node(editor, "loadtestimage", (300, 300))
    show = add_node(editor, "show image", (800, 300))
    connect(editor, loader, 0, show, "image")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (0, 200, 0)).save(buffer, format="PNG")
    editor.get_by_test_id(f"w-{loader}-image-upload").set_input_files(
        {"name": "upload-e2e.png", "mimeType": "image/png", "buffer": buffer.getvalue()})
    expect(editor.get_by_test_id(f"w-{loader}-image")).to_have_value(re.compile(r"^upload-e2e.*\.png$"))
    editor.get_by_test_id("queue").click()
    expect(editor.get_by_test_id("status")).to_have_text("done", timeout=20_000)
    editor.wait_for_function("img => img.complete && img.naturalWidth === 16",
                             arg=editor.get_by_test_id(f"result-{show}").element_handle())


def test_a_second_run_of_an_unchanged_graph_marks_its_nodes_cached(editor) -> None:
    drop_json(editor, ui_workflow(
        [{"id": 1, "type": "Constant", "widgets_values": [3],
          "outputs": [{"name": "value", "type": "INT", "links": [1]}]},
         {"id": 2, "type": "ToText", "widgets_values": [False], "inputs": [{"name": "value", "type": "INT", "link": 1}],
          "outputs": [{"name": "text", "type": "STRING", "links": [2]}]},
         {"id": 3, "type": "Output", "inputs": [{"name": "value", "type": "*", "link": 2}]}],
        [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "STRING"]]))
    for _ in range(2):
        editor.get_by_test_id("queue").click()
        expect(editor.get_by_test_id("status")).to_have_text("done", timeout=20_000)
    expect(editor.locator(node("1") + " .sd-node")).to_have_class(re.compile(r"\bcached\b"))
    expect(editor.locator(node("2") + " .sd-node")).to_have_class(re.compile(r"\bcached\b"))


def test_a_batch_can_be_cancelled_while_pending_and_interrupted_while_running(editor) -> None:
    drop_json(editor, ui_workflow(
        [{"id": 1, "type": "SolidImage", "widgets_values": ["red", 16, 0, "increment"],
          "outputs": [{"name": "image", "type": "IMAGE", "links": [1]}]},
         {"id": 2, "type": "SlowBrighten", "widgets_values": [100],
          "inputs": [{"name": "image", "type": "IMAGE", "link": 1}],
          "outputs": [{"name": "image", "type": "IMAGE", "links": [2]}]},
         {"id": 3, "type": "ShowImage", "widgets_values": ["batch"],
          "inputs": [{"name": "image", "type": "IMAGE", "link": 2}]}],
        [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]]))
    editor.get_by_test_id("batch").fill("3")
    editor.get_by_test_id("queue").click()
    expect(editor.get_by_test_id("w-1-seed")).to_have_value("3")  # incremented once per queued prompt
    editor.get_by_test_id("toggle-queue").click()
    expect(editor.get_by_test_id("queue-running")).to_have_count(1)
    expect(editor.get_by_test_id("queue-pending")).to_have_count(2)
    editor.get_by_test_id("queue-pending").first.get_by_role("button", name="cancel").click()
    expect(editor.get_by_test_id("queue-pending")).to_have_count(1)
    screenshot(editor, "queue-running-and-pending")
    first_running = editor.get_by_test_id("queue-running").inner_text()
    editor.get_by_test_id("interrupt").click()  # the toolbar's Stop: the first prompt
    expect(editor.get_by_test_id("queue-pending")).to_have_count(0, timeout=20_000)
    expect(editor.get_by_test_id("queue-running")).not_to_have_text(first_running)
    editor.get_by_test_id("queue-running").get_by_role("button", name="stop").click()  # the panel's: the last
    expect(editor.get_by_test_id("queue-running")).to_have_count(0, timeout=20_000)
    expect(editor.get_by_test_id("status")).to_have_text("interrupted")
    history = editor.evaluate("fetch('/history').then(r => r.json())")
    ours = [entry for entry in history.values() 
            if entry["prompt"][2].get("3", {}).get("inputs", {}).get("filename_prefix") == "batch"]
    assert [entry["status"]["status_str"] for entry in ours] == ["error", "error"]  # the cancelled one never ran
    assert sorted(entry["prompt"][2]["1"]["inputs"]["seed"] for entry in ours) == [0, 2]


def test_a_link_dragged_off_its_input_onto_nothing_is_removed_and_undo_restores_it(editor) -> None:
    drop_json(editor, into_output(1, "Constant", [3], 2))
    expect(editor.locator(".react-flow__edge")).to_have_count(1)
    end = editor.locator(handle("2", "in:value")).bounding_box()
    editor.mouse.move(end["x"] + end["width"] / 2, end["y"] + end["height"] / 2)
    editor.mouse.down()
    editor.mouse.move(end["x"] + 60, end["y"] + 300, steps=8)
    editor.mouse.up()
    expect(editor.locator(".react-flow__edge")).to_have_count(0)
    editor.keyboard.press("Control+z")
    expect(editor.locator(".react-flow__edge")).to_have_count(1)


def test_the_palette_opens_from_the_keyboard_and_browses_by_category(editor) -> None:
    editor.locator(".react-flow__pane").click(position={"x": 600, "y": 600})
    editor.keyboard.press("/")
    expect(editor.get_by_test_id("palette")).to_be_focused()
    editor.get_by_role("button", name="test/image").click()
    editor.get_by_test_id("palette-item-SlowBrighten").click()
    expect(editor.locator(".react-flow__node-sd")).to_have_count(2)
    assert [n["classType"] for n in graph_nodes(editor)] == ["Note", "SlowBrighten"]


def test_save_and_export_download_the_ui_and_api_json_and_tabs_keep_their_own_graphs(editor) -> None:
    drop_json(editor, into_output(1, "Constant", [5], 2), "first.json")
    with editor.expect_download() as saved:
        editor.get_by_role("button", name="Save", exact=True).click()
    workflow = json.loads(Path(saved.value.path()).read_text())
    assert saved.value.suggested_filename == "first.json"
    assert workflow == editor.evaluate("window.sdgraph.workflow()")
    assert [n["widgets_values"] for n in workflow["nodes"]] == [[5], []] and workflow["version"] == 0.4
    with editor.expect_download() as exported:
        editor.get_by_role("button", name="Export API").click()
    assert json.loads(Path(exported.value.path()).read_text()) == {
        "1": {"class_type": "Constant", "inputs": {"value": 5}, "_meta": {"title": "Integer constant"}},
        "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}, "_meta": {"title": "Output"}}}

    editor.get_by_test_id("new-tab").click()
    expect(editor.get_by_test_id("tab")).to_have_count(2)
    assert [n["classType"] for n in graph_nodes(editor)] == ["Note"]
    editor.get_by_test_id("tab").first.click()
    expect(editor.get_by_test_id("w-1-value")).to_have_value("5")
    editor.wait_for_function("() => JSON.parse(localStorage.getItem('sdgraph.workflows') || '{}').tabs?.length === 2")
    editor.reload()
    expect(editor.get_by_test_id("tab")).to_have_count(2)
    expect(editor.get_by_test_id("tab").first).to_contain_text("first")
    expect(editor.get_by_test_id("w-1-value")).to_have_value("5")


def test_a_number_changes_by_dragging_its_name_and_by_its_arrows_within_its_range(editor) -> None:
    constant = add_node(editor, "integer constant", (400, 300))
    label = editor.locator(f'{node(constant)} .drag-label')
    box = label.bounding_box()
    editor.mouse.move(box["x"] + 5, box["y"] + box["height"] / 2)
    editor.mouse.down()
    editor.mouse.move(box["x"] + 5 + 60, box["y"] + box["height"] / 2, steps=6)  # 6 px a step
    editor.mouse.up()
    expect(editor.get_by_test_id(f"w-{constant}-value")).to_have_value("10")
    editor.get_by_role("button", name="increase value").click()
    expect(editor.get_by_test_id(f"w-{constant}-value")).to_have_value("11")
    field = editor.get_by_test_id(f"w-{constant}-value")
    field.fill("5000")
    field.press("Enter")
    expect(field).to_have_value("1000")  # the schema's max
    editor.locator(".react-flow__pane").click(position={"x": 50, "y": 700})
    editor.keyboard.press("Control+z")
    expect(field).to_have_value("10")  # the arrow and the typing right after it were one edit
    editor.keyboard.press("Control+z")
    expect(field).to_have_value("0")  # the drag was another


def test_a_link_dragged_from_a_widget_onto_nothing_offers_a_primitive_node_that_takes_its_value(editor) -> None:
    constant = add_node(editor, "integer constant", (600, 300))
    editor.get_by_test_id(f"w-{constant}-value").fill("9")
    editor.get_by_test_id(f"w-{constant}-value").blur()
    start = editor.locator(handle(constant, "in:value")).bounding_box()
    editor.mouse.move(start["x"] + start["width"] / 2, start["y"] + start["height"] / 2)
    editor.mouse.down()
    editor.mouse.move(start["x"] - 250, start["y"] + 200, steps=8)
    editor.mouse.up()
    editor.get_by_test_id("palette").fill("primitive")
    editor.keyboard.press("Enter")
    expect(editor.locator(".react-flow__edge")).to_have_count(1)
    (primitive,) = [n for n in graph_nodes(editor) if n["classType"] == "PrimitiveNode"]
    expect(editor.get_by_test_id(f"w-{primitive['id']}-value")).to_have_value("9")
    expect(editor.get_by_test_id(f"w-{constant}-value")).to_have_count(0)  # the widget is now an input
    editor.get_by_test_id(f"w-{primitive['id']}-value").fill("12")
    editor.get_by_test_id(f"w-{primitive['id']}-value").blur()
    assert api_prompt(editor)[constant]["inputs"] == {"value": 12}


def test_right_click_menus_act_on_the_node_and_open_the_palette_on_the_canvas(editor) -> None:
    constant = add_node(editor, "integer constant", (400, 300))
    editor.locator(node(constant) + " .sd-title").click(button="right")
    editor.get_by_test_id("context-menu").get_by_text("Bypass").click()
    expect(editor.locator(node(constant) + " .sd-node")).to_have_class(re.compile(r"\bbypassed\b"))
    editor.locator(node(constant) + " .sd-title").click(button="right")
    editor.get_by_test_id("context-menu").get_by_text("Duplicate").click()
    expect(editor.locator(".react-flow__node-sd")).to_have_count(3)
    editor.locator(".react-flow__pane").click(button="right", position={"x": 700, "y": 650})
    editor.get_by_test_id("context-menu").get_by_text("Add node…").click()
    expect(editor.get_by_test_id("palette")).to_be_visible()


def test_a_collapsed_node_keeps_its_links_and_saves_the_flag(editor) -> None:
    drop_json(editor, into_output(1, "Constant", [4], 2))
    editor.locator(node("1")).get_by_role("button", name="collapse").click()
    expect(editor.locator(node("1") + " .sd-node")).to_have_class(re.compile(r"\bcollapsed\b"))
    expect(editor.get_by_test_id("w-1-value")).to_have_count(0)
    expect(editor.locator(".react-flow__edge")).to_have_count(1)
    assert editor.evaluate("window.sdgraph.workflow().nodes[0].flags") == {"collapsed": True}
    assert api_prompt(editor)["2"]["inputs"] == {"value": ["1", 0]}
    editor.locator(node("1") + " .sd-title span").click()
    editor.keyboard.press("Alt+c")
    expect(editor.get_by_test_id("w-1-value")).to_have_value("4")


def test_click_and_shift_click_select_nodes_and_delete_removes_them_and_a_clicked_link(editor) -> None:
    drop_json(editor, ui_workflow(
        [{"id": 1, "type": "Constant", "widgets_values": [1], "outputs": [{"name": "value", "type": "INT", "links": [1]}]},
         {"id": 2, "type": "Output", "inputs": [{"name": "value", "type": "*", "link": 1}]},
         {"id": 3, "type": "Constant", "widgets_values": [2], "pos": [100, 500]},
         {"id": 4, "type": "Constant", "widgets_values": [3], "pos": [500, 500]}],
        [[1, 1, 0, 2, 0, "INT"]]))
    editor.locator(".react-flow__edge").click()
    editor.keyboard.press("Delete")
    expect(editor.locator(".react-flow__edge")).to_have_count(0)
    editor.locator(node("3") + " .sd-title").click()
    editor.locator(node("4") + " .sd-title").click(modifiers=["Shift"])
    expect(editor.locator(".react-flow__node-sd.selected")).to_have_count(2)
    editor.keyboard.press("Delete")
    assert sorted(n["id"] for n in graph_nodes(editor)) == ["1", "2"]


def test_dragging_a_node_moves_it_in_one_undo_step(editor) -> None:
    drop_json(editor, into_output(1, "Constant", [1], 2))
    before = {n["id"]: n["pos"] for n in graph_nodes(editor)}
    title = editor.locator(node("1") + " .sd-title").bounding_box()
    editor.mouse.move(title["x"] + 30, title["y"] + title["height"] / 2)
    editor.mouse.down()
    editor.mouse.move(title["x"] + 130, title["y"] + 80, steps=10)
    editor.mouse.up()
    moved = {n["id"]: n["pos"] for n in graph_nodes(editor)}
    assert moved["2"] == before["2"] and moved["1"][0] > before["1"][0] and moved["1"][1] > before["1"][1]
    editor.keyboard.press("Control+z")
    assert {n["id"]: n["pos"] for n in graph_nodes(editor)} == before
