"""A step compiled before its large arguments exist, and refused when it cannot fit a device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxret.errors import RunError
from jaxret.parallel import make_mesh
from jaxret.train import state as st

N = 256  # [N, N] float32: 256 KiB


def two_matmuls(x):  # [N, N] → [N, N]; x @ x is a temporary the second matmul reads
    return jnp.tanh(x @ x) @ x


def test_a_program_that_cannot_fit_is_refused_naming_the_fixes(caplog):
    """The bytes a device needs are arguments + new outputs + temporaries, reckoned from the
    arrays themselves: x, the result and at least the [N, N] product in between (3 · N² ·
    4 bytes). One byte less than that is refused with the fixes named; fails if the
    temporaries are left out of `device_bytes_needed` (then 2 · N² · 4 fits). Where a limit
    exists the compiled size is logged as a warning (seen on a pod), not on a refusal."""
    x = jax.ShapeDtypeStruct((N, N), jnp.float32)
    jitted = jax.jit(two_matmuls)
    floor = 3 * N * N * 4
    need = st.device_bytes_needed(jitted.lower(x).compile())
    assert floor <= need < floor + N * N * 4  # no second copy of anything
    with pytest.raises(RunError, match=r"needs 0\.00 GB per device .*: lower train\.batch_size"):
        st.compile_ahead(jitted, (x,), "the step", "lower train.batch_size", floor - 1)
    ours = lambda: [r for r in caplog.records if r.name == st.log.name]
    assert not ours()  # refused: the error line alone
    compiled = st.compile_ahead(jitted, (x,), "the step", "lower train.batch_size", need)
    # A device with a limit (an accelerator): what it compiled to is shown, not just logged.
    (record,) = ours()
    assert record.levelname == "WARNING" and record.getMessage().startswith("the step compiled")
    a = np.random.RandomState(0).randn(N, N).astype(np.float32) / N
    np.testing.assert_allclose(
        np.asarray(compiled(a)), np.tanh(a.astype(np.float64) @ a) @ a, rtol=1e-4, atol=1e-6
    )


def test_a_donated_argument_is_not_counted_twice():
    """An elementwise step whose donated argument's buffer takes its output needs N² · 4
    bytes, not 2 · N² · 4 as without donation; fails if the aliased bytes are not subtracted
    from the outputs."""
    x = jax.ShapeDtypeStruct((N, N), jnp.float32)
    scale = lambda v: v * 2 + 1
    assert st.device_bytes_needed(jax.jit(scale).lower(x).compile()) == 2 * N * N * 4
    donated = jax.jit(scale, donate_argnums=0).lower(x).compile()
    assert st.device_bytes_needed(donated) == N * N * 4


def test_the_need_is_per_device_for_a_sharded_argument():
    """An elementwise step on rows sharded over the 8 devices needs each device's block in
    and out: 2 · rows / 8 · width · 4 bytes, the layout's arithmetic (fails if the need were
    reckoned from the global shapes, 8 × as much)."""
    mesh = make_mesh(("data",), (8,))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    x = jax.ShapeDtypeStruct((8 * 1024, 64), jnp.float32, sharding=rows)
    step = jax.jit(lambda v: v * 2, in_shardings=rows, out_shardings=rows)
    assert st.device_bytes_needed(step.lower(x).compile()) == 2 * 1024 * 64 * 4


def test_a_backend_without_memory_analysis_compiles_unchecked():
    """A compiled program whose `memory_analysis()` is None (a backend without it) is
    returned as it is, even under a limit: nothing to check it against. Fails if the
    analysis is read without that guard (AttributeError)."""

    class Compiled:
        def memory_analysis(self):
            return None

    class Lowered:
        def compile(self):
            return Compiled()

    class Step:
        def lower(self, *args):
            return Lowered()

    assert isinstance(st.compile_ahead(Step(), (), "the step", "fixes", 1), Compiled)
