"""A checkpoint replaced by one of another layout between the check of the headers and the ingest
(a training job rewriting its folder) is one ``error:`` line naming it, in one process and on Dask
workers, and no store or mode file is left."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import cmdtool.distributed.ingest
import cmdtool.stores
from helpers import cmd, error_line


def replacing_after_the_check(monkeypatch, module, victim):
    """``read_signatures`` of ``module`` checks the headers, then ``victim`` is replaced by a
    checkpoint of one other tensor."""
    check = module.read_signatures

    def then_replace(*args, **kwargs):
        checked = check(*args, **kwargs)
        save_file({"other.weight": torch.zeros(3)}, str(victim), metadata={"epoch": "3"})
        return checked

    monkeypatch.setattr(module, "read_signatures", then_replace)


@pytest.mark.parametrize("where", ["one process", "dask"])
def test_a_checkpoint_replaced_during_the_ingest_is_one_line(tmp_path, runner, run_dir, monkeypatch, where):
    victim = run_dir / "epoch_3.safetensors"
    options = []
    if where == "dask":
        pytest.importorskip("dask.distributed")
        options = ["--workers", "1"]
    replacing_after_the_check(monkeypatch, cmdtool.distributed.ingest if options else cmdtool.stores, victim)
    result = cmd(runner, "fit", run_dir, "-o", tmp_path / "m.cmd.h5", "--trajectory", tmp_path / "store.h5", *options)
    # a socket Dask's own machinery left is collected now and then: Python never shows ResourceWarning by default
    result.warnings = [w for w in result.warnings if not w.startswith("ResourceWarning: unclosed <socket")]
    message = error_line(result)
    assert message == (f"{victim}: tensor 'bn.num_batches_tracked' is missing (present in the layout checked "
                       "before the ingest): the file was replaced during the ingest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
