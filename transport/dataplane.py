"""The master's data plane: the data ROUTER, which peer holds which rank, and the StarMaster over them."""
from __future__ import annotations

from collections.abc import Callable

import zmq

from tpi.errors import GroupError
from tpi.transport.allreduce import StarMaster
from tpi.transport.keeper import LinkSettings


class DataPlane:
    """Ranks as admitted (any thread) and the rank-0 communicator over them."""

    def __init__(self, sock: zmq.Socket, settings: LinkSettings, lost: Callable[[], dict[str, str]]):
        self.sock = sock
        self._settings = settings
        self._lost = lost
        self._ranks: dict[int, tuple[str, str, int]] = {}  # rank -> (peer_id, name, world)
        self._star_only: dict[int, bool] = {}  # rank -> what its Assign said (the communicator follows it)

    def assign(self, rank: int, peer_id: str, name: str, world: int, star_only: bool = False) -> None:
        self._ranks[rank] = (peer_id, name, world)
        self._star_only[rank] = star_only

    def forget(self) -> None:
        """Drop every rank assignment, before admitting a re-planned group from rank 1 again."""
        self._ranks.clear()
        self._star_only.clear()

    def communicator(self, wire_dtype: str = "f32", ready_timeout_s: float | None = None,
                     awaiting: set[int] | None = None, first_seq: int = 0) -> StarMaster:
        """The rank-0 StarMaster over every admitted rank, once all announced Ready.

        Regrouping a running group: awaiting names the ranks just (re)admitted, the only ones
        that announce Ready again; first_seq continues the replaced communicator's step numbers.
        Two ranks swap partials or use the star as their Assign said (star_only), so both ends agree.
        """
        ranks = sorted(self._ranks)
        worlds = {w for _, _, w in self._ranks.values()}
        if ranks != list(range(1, len(ranks) + 1)) or worlds != {len(ranks) + 1}:
            raise GroupError(f"admitted ranks {ranks} with world sizes {sorted(worlds)} do not form a "
                             "group; admit ranks 1..N-1 with world N")
        star_only = {self._star_only[r] for r in ranks}
        if len(star_only) > 1:
            raise GroupError("admitted ranks were told different allreduce paths (Assign.star_only); "
                             "admit every rank with the same one")
        s = self._settings
        comm = StarMaster(self.sock, [self._ranks[r][0] for r in ranks], [self._ranks[r][1] for r in ranks],
                          wire_dtype, self._lost, s.step_timeout_s, s.max_frame, first_seq,
                          star_only=star_only.pop() if star_only else False)
        comm.wait_ready(ready_timeout_s if ready_timeout_s is not None else s.step_timeout_s, awaiting)
        return comm
