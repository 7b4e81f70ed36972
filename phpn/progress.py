"""Progress reporting shared by the terminal and notebooks (tqdm.auto) and the app (st.progress).

Long stages call ``progress(stage, done, total)``; a callback may raise
:class:`phpn.errors.Cancelled` to stop the work cleanly.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

from tqdm import TqdmWarning

with warnings.catch_warnings():
    # In a notebook without ipywidgets tqdm.auto falls back to text bars, which serve as well:
    # its advice to install ipywidgets is not phpn's to print on every run.
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm  # widgets in a notebook that has ipywidgets, text elsewhere

ProgressFn = Callable[[str, int, int], None]


class TqdmProgress:
    """One tqdm bar per stage, on stderr so that ``--json`` output stays clean."""

    def __init__(self, disable: bool = False):
        self.disable = disable
        self._bars = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.disable:
            return

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, leave=True)
        bar.total = total
        if done > bar.n:
            bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def report(progress: Optional[ProgressFn], stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


class RepeatLast:
    """A progress callback that remembers its last report; ``repeat()`` sends it again.

    Called between the layers of a long forward pass, ``repeat`` gives a cancelling callback
    (one that raises :class:`phpn.errors.Cancelled`) the chance to stop it mid-batch.
    """

    def __init__(self, progress: ProgressFn):
        self.progress, self.last = progress, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.last = (stage, done, total)
        self.progress(stage, done, total)

    def repeat(self) -> None:
        if self.last is not None:
            self.progress(*self.last)
