"""Fixtures shared by the tests: an isolated cache, the planted run and its folder, a CLI runner.
Helper functions are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import Planted, plant, write_run


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Default trajectory stores go under the test's tmp folder, never the user's home."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CMDTOOL_CACHE", str(cache))
    return cache


@pytest.fixture
def planted() -> Planted:
    return plant()


@pytest.fixture
def run_dir(tmp_path, planted) -> Path:
    """A folder of 20 safetensors checkpoints of the planted run."""
    return write_run(tmp_path / "run", planted.states())


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


# The fast tier: `make test-fast` (`pytest -m "not slow"`) leaves out the tests marked slow here, and
# runs in under a minute; `make test` (and CI) runs everything. Slow: whole modules that train real
# models, start Dask clusters, fuzz or build reports, and the single tests that took 0.8 s or more
# (on the shared 2-core machine under load; `pytest --durations=0` shows the times).
SLOW_MODULES = frozenset({"test_adapters", "test_dcp", "test_distributed", "test_distributed_untrusted",
                          "test_export", "test_hf_resume", "test_integrations", "test_landscape",
                          "test_modefile_fuzz", "test_portable", "test_report", "test_report_selection",
                          "test_report_untrusted", "test_report_verdict", "test_stacks", "test_training_fuzz",
                          "test_weight_averaging"})
SLOW_TESTS = frozenset({
    "test_auto_modes::test_fit_costs_one_linkage_for_every_cut_of_modes_auto",
    "test_cli::test_sizes_against_the_checkpoints_own_bytes",
    "test_concurrency::test_a_held_lock_is_one_line_after_the_wait",
    "test_decompose::test_clusters_equal_scipys_on_near_duplicate_and_tied_rows",
    "test_decompose::test_results_do_not_depend_on_the_tile_size",
    "test_estimator::test_fit_reads_the_array_where_it_lies_and_writes_nothing",
    "test_estimator::test_load_continues_an_online_fit",
    "test_estimator::test_partial_fit_equals_fit_warmup_and_cmd_update",
    "test_ingest_replaced::test_a_checkpoint_replaced_during_the_ingest_is_one_line",
    "test_modefile_fields::test_crafted_field_is_refused_and_writes_nothing",
    "test_modefile_untrusted::test_crafted_mode_file_is_refused_and_writes_nothing",
    "test_online::test_online_cmd_takes_state_dicts_as_training_holds_them",
    "test_untrusted_links::test_links_in_a_mode_file_are_refused",
    "test_untrusted_strings::test_report_md_writes_stored_markdown_and_html_as_text",
    "test_cli::test_module_entry_point_and_version",
    "test_cli_failures::test_full_disk_is_one_line_and_leaves_nothing",
    "test_cli_failures::test_many_metrics_plot_the_first_twelve",
    "test_concurrency::test_an_update_waits_for_the_lock_and_then_reads_the_first_updates_file",
    "test_concurrency::test_report_refuses_a_store_rebuilt_since_the_fit",
    "test_concurrency::test_two_concurrent_fits_of_different_selections",
    "test_concurrency::test_two_concurrent_updates_lose_nothing",
    "test_decompose::test_fit_modes_auto_writes_the_curve_and_info_shows_it",
    "test_decompose::test_streaming_fit_equals_naive_in_memory_implementation",
    "test_modefile::test_drop_unmodelled_leaves_float_tensors_out_and_refuses_whole_checkpoints",
    "test_modefile::test_parameter_reader_reads_what_parameters_reads",
    "test_modefile_fields::test_the_written_fields_still_open",
    "test_online::test_fit_warmup_equals_fit_of_the_warmup_then_update",
    "test_online::test_killing_watch_mid_update_leaves_a_readable_mode_file",
    "test_online::test_online_cmd_in_a_loop_equals_fit_warmup",
    "test_online::test_report_labels_an_online_fit_and_marks_the_warmup",
    "test_online::test_report_reads_the_checkpoints_an_online_cmd_loop_observed_in_state_dict_order",
    "test_online::test_update_equals_batch_fit_with_the_same_labels_and_references",
    "test_online::test_update_of_an_ema_fit_reads_the_ema_weights",
    "test_online::test_update_state_does_not_grow_with_absorbed_checkpoints",
    "test_online::test_update_with_numpy_safetensors_never_imports_torch",
    "test_online::test_watch_absorbs_complete_files_only_and_stops_at_until",
    "test_pipeline::test_modes_auto_keeps_its_curve_through_warmup_and_update",
    "test_reconstruct::test_bad_at_exits_2_and_writes_nothing",
    "test_reconstruct::test_constant_tensors_reconstruct_exactly",
    "test_reconstruct::test_excluded_tensors_are_carried_verbatim",
    "test_reconstruct::test_failure_mid_write_leaves_nothing",
    "test_reconstruct::test_mixed_dtypes_written_back_in_source_dtype",
    "test_reconstruct::test_reconstruct_all_round_trip",
    "test_reconstruct::test_reconstruct_leaves_source_untouched_into_same_names",
    "test_reconstruct::test_reconstruct_matches_library_state_dict",
    "test_reconstruct::test_reconstructed_state_dict_loads_strict",
    "test_reconstruct::test_reference_parameters_reconstruct_to_float32_rounding",
    "test_reconstruct::test_refuses_to_overwrite_without_force",
    "test_reconstruct::test_safetensors_written_without_torch_are_the_same_bytes",
    "test_safetensors_writer::test_reconstructed_run_is_save_files_bytes",
    "test_safetensors_writer::test_sample_run_is_save_files_bytes",
    "test_samples::test_fit_and_reconstruct_the_sample_run",
    "test_training::test_a_corrupt_saved_state_is_refused",
    "test_training::test_a_model_moved_to_another_device_is_an_error",
    "test_training::test_a_saved_state_of_strided_tensors_resumes_exactly",
    "test_training::test_a_state_saved_without_the_frozen_fits_resumes",
    "test_training::test_cli_reads_an_embedded_mode_file",
    "test_training::test_device_update_in_blocks_from_the_model_tensors",
    "test_training::test_embedding_picks_fits_that_stopped_moving_and_holds_them",
    "test_training::test_embedding_relative_takes_a_share_of_the_free_ones",
    "test_training::test_state_dict_is_a_copy_and_loading_a_warmup_state_removes_the_hooks",
    "test_training::test_state_dict_resumes_exactly",
    "test_training::test_the_compiled_library_is_private_and_built_once_whatever_the_umask",
    "test_training::test_the_compiled_update_is_never_loaded_from_a_folder_others_can_write",
    "test_trajectory::test_constant_parameters_are_flagged",
    "test_trajectory::test_default_store_lives_in_the_cache_folder",
    "test_trajectory::test_fitting_a_safetensors_run_never_imports_torch",
    "test_trajectory::test_importing_the_cli_loads_neither_torch_nor_scipy",
    "test_trajectory::test_store_holds_the_checkpoints_as_a_contiguous_float32_matrix",
    "test_trajectory::test_the_store_reserves_its_rows_and_maps_varies",
    "test_trajectory::test_unchanged_folder_reuses_the_store_and_a_changed_one_rebuilds_it",
    "test_untrusted_checkpoints::test_carried_names_that_are_hdf5_paths_round_trip",
    "test_untrusted_checkpoints::test_deeply_nested_wrapper_value_is_dropped_not_recursed",
    "test_untrusted_checkpoints::test_every_safetensors_dtype_is_carried_exactly",
    "test_untrusted_checkpoints::test_times_beyond_int64_or_not_ascii_are_not_times",
    "test_untrusted_checkpoints::test_torch_views_dtypes_and_shared_storage",
})


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.path.stem
        if module in SLOW_MODULES or f"{module}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
