"""What the closures of tests/test_closures.py reach by reference: an app module's functions and classes.

Imports nothing from the package, so that the standalone worker of those tests stays package-free.
"""

from __future__ import annotations


def add(a: int, b: int) -> int:
    return a + b


def scale(a: int, b: int) -> int:
    return a * b


class Greeter:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def greet(self, name: str) -> str:
        return f"{self.greeting}, {name}"
