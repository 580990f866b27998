"""AsyncEngine's idle hook (the server re-places hot experts there): called on the engine thread
when the Engine runs out of work; a failing hook is logged and serving goes on."""

import asyncio
import threading

from tandem.runtime.async_engine import AsyncEngine
from tandem.runtime.llm import LLM
from tandem.runtime.sampling import SamplingParams
from tandem.testing.tiny import write_tiny


def test_idle_hook_runs_when_the_engine_runs_dry(tmp_path):
    llm = LLM(write_tiny(tmp_path, "deepseek_v3", seed=41), dtype="float32", progress=False, max_batch=2)
    calls: list[str] = []

    def hook():
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("a failing hook must not stop serving")

    engine = AsyncEngine(llm.engine, on_idle=hook)
    engine.start()
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)

    async def one(prompt):
        async with engine.request(prompt, params) as outputs:
            return [o.token async for o in outputs]

    async def main():
        first = await one([5, 6, 7])
        second = await one([8, 9])  # served after the first hook call raised
        return first, second

    try:
        first, second = asyncio.run(main())
    finally:
        engine.close()
    assert len(first) == len(second) == 4
    assert calls == ["tandem-engine", "tandem-engine"]  # once per request: each left the engine idle
