"""A command stopped by a signal stops, even when the signal's handler runs where Python drops exceptions."""

import subprocess
import sys
import textwrap

# A command whose garbage-collector callback (JAX registers one) is running when SIGTERM arrives: the handler's
# KeyboardInterrupt is raised inside the callback, where Python prints and drops it. The loop after it ends only if
# the interrupt comes again.
SCRIPT = textwrap.dedent("""
    import gc, os, signal, time
    from kept_jax.errors import cli_entry

    fired = []

    def callback(phase, info):
        if not fired:
            fired.append(phase)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100_000):  # the handler runs in here
                pass

    @cli_entry
    def main():
        gc.callbacks.append(callback)
        gc.collect()
        print("the callback ran", flush=True)
        while True:
            time.sleep(0.01)

    raise SystemExit(main())
""")


def test_an_interrupt_dropped_in_a_gc_callback_still_stops_the_command():
    # Without the interrupt sent again, it runs until the timeout (checked).
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30)
    assert "the callback ran" in proc.stdout
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "interrupted; nothing was written\n"
