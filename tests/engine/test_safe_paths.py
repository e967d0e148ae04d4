"""resolve_inside keeps every file access inside its root; list_files gives COMBO options."""
from __future__ import annotations

import os

import pytest

from engine.paths import UnsafePathError, list_files, resolve_inside


def test_relative_name_resolves_inside_the_root(tmp_path):
    assert resolve_inside(tmp_path, "sd15/model.safetensors") == tmp_path.resolve() / "sd15" / "model.safetensors"
    assert resolve_inside(tmp_path, "a/./b.png") == tmp_path.resolve() / "a" / "b.png"


@pytest.mark.parametrize("name, reason", [
    ("/etc/passwd", "must be relative to"), ("\\\\server\\share", "must be relative to"),
    ("C:\\Windows", "must be relative to"), ("../secret", "must not contain '..'"),
    ("a/../../secret", "must not contain '..'"), ("a\\..\\b", "must not contain '..'"),
    ("bad\x00name.png", "contains a NUL byte"),
])
def test_escaping_names_are_refused_with_the_reason(tmp_path, name, reason):
    with pytest.raises(UnsafePathError, match=reason):
        resolve_inside(tmp_path, name)


def test_non_string_name_is_refused(tmp_path):
    with pytest.raises(UnsafePathError, match="must be a string, got int"):
        resolve_inside(tmp_path, 3)


def test_symlink_leading_outside_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("x")
    os.symlink(outside, root / "link")
    with pytest.raises(UnsafePathError, match="leads outside .* through a symlink"):
        resolve_inside(root, "link/secret.txt")


def test_symlink_staying_inside_and_a_symlinked_root_are_fine(tmp_path):
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    os.symlink(real / "sub", real / "alias")
    os.symlink(real, tmp_path / "models")
    assert resolve_inside(tmp_path / "models", "alias/x.bin") == real.resolve() / "sub" / "x.bin"


def test_list_files_is_sorted_relative_posix_filtered_by_extension(tmp_path):
    for name in ["b.safetensors", "a/z.CKPT", "a/m.safetensors", "notes.txt", ".hidden/x.safetensors"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert list_files(tmp_path, [".safetensors", ".ckpt"]) == ["a/m.safetensors", "a/z.CKPT", "b.safetensors"]
    assert list_files(tmp_path) == ["a/m.safetensors", "a/z.CKPT", "b.safetensors", "notes.txt"]


def test_list_files_of_a_missing_root_is_empty(tmp_path):
    assert list_files(tmp_path / "absent", [".pt"]) == []


def test_list_files_leaves_out_symlinks_leading_outside(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "elsewhere.pt").write_text("")
    (root / "own.pt").write_text("")
    os.symlink(tmp_path / "elsewhere.pt", root / "linked.pt")
    assert list_files(root, [".pt"]) == ["own.pt"]
