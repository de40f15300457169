"""Progress bars of the slow stages (responses, features), or nothing when progress is off."""

from __future__ import annotations


def bar(progress: bool, total: int, desc: str):
    """A tqdm bar over ``total`` sequences, or None (every helper here accepts None)."""
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True)


def tick(bar, done: int, **postfix) -> None:
    if bar is not None:
        bar.n = done
        if postfix:
            bar.set_postfix(**postfix, refresh=False)
        bar.refresh()


def close(bar) -> None:
    if bar is not None:
        bar.close()
