"""The registry's process-wide budget of request-body bytes (pure asyncio, no servers)."""

from __future__ import annotations

import asyncio

from services.registry.commandlog import ByteBudget


async def test_a_take_past_the_budget_waits_until_bytes_are_given_back():
    budget = ByteBudget(10)
    await budget.take(6)
    waiting = asyncio.create_task(budget.take(6))
    await asyncio.sleep(0.05)
    assert not waiting.done() and budget.used == 6
    budget.give(6)
    await asyncio.wait_for(waiting, 1)
    assert budget.used == 6


async def test_one_request_larger_than_the_budget_still_goes_alone():
    budget = ByteBudget(10)
    await asyncio.wait_for(budget.take(25), 1)  # nothing else held: it must not wait forever
    second = asyncio.create_task(budget.take(1))
    await asyncio.sleep(0.05)
    assert not second.done()
    budget.give(25)
    await asyncio.wait_for(second, 1)
    assert budget.used == 1


async def test_many_waiters_each_get_their_turn():
    budget = ByteBudget(4)
    order: list[int] = []

    async def one(number: int) -> None:
        await budget.take(3)
        order.append(number)
        await asyncio.sleep(0.01)
        budget.give(3)

    await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(6))), 5)
    assert sorted(order) == list(range(6)) and budget.used == 0


async def test_try_take_takes_only_what_needs_no_wait():
    budget = ByteBudget(10)
    assert budget.try_take(8) and budget.used == 8
    assert not budget.try_take(3) and budget.used == 8
    assert budget.try_take(2) and budget.used == 10
