"""The main end-to-end paths of tests/test_service.py and tests/test_training.py, unchanged, against
servers on PostgreSQL: this module's `server` and `fresh_server` fixtures take the place of
conftest's SQLite ones for the test functions imported here (pytest resolves a test's fixtures in
the module that collects it). Restarts (`ServerProcess(fresh_server.db)`) reopen the same database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.postgres import PostgresServer
from tests.server_process import ServerProcess
from tests.test_service import (  # noqa: F401 -- fixtures and tests collected here
    lecture_id,
    stub,
    test_backward_streams_lecture_gradients_in_reverse_topological_order,
    test_backward_with_empty_wrt_streams_every_parameter_and_loss_grad_seeds_vector_losses,
    test_create_reports_topological_order_inputs_and_parameters,
    test_forward_returns_fetches_in_order_including_intermediates,
    test_graphs_survive_sigkill_and_restart,
    test_list_pages_through_every_graph_and_delete_removes_one,
    test_sigterm_shuts_down_gracefully,
)
from tests.test_training import (  # noqa: F401
    test_a_bad_batch_ends_the_stream_and_keeps_the_last_good_step,
    test_a_cancelled_stream_keeps_and_commits_its_completed_steps,
    test_concurrent_streams_on_one_graph_apply_whole_steps,
    test_finished_stream_survives_sigkill_exactly,
    test_optimizers_follow_pytorch_formulas_over_several_steps,
    test_parameters_after_a_stream_are_initial_plus_streamed_updates_bit_for_bit,
    test_set_parameters_checks_shape_and_dtype_and_forward_uses_them,
    test_sigkill_mid_stream_recovers_one_committed_checkpoint,
)


@pytest.fixture(scope="module")
def server(postgres: PostgresServer) -> Iterator[ServerProcess]:
    process = ServerProcess(postgres.database()).start()
    yield process
    process.kill()


@pytest.fixture
def fresh_server(postgres: PostgresServer) -> Iterator[ServerProcess]:
    process = ServerProcess(postgres.database()).start()
    yield process
    process.kill()
