"""Searchable DAGs: mutable vertices (candidate ops, kernel sizes, skippable blocks), the channel widths
of a flexible DAG as mutables, choice dicts, the slimmable interface and fixed sub-networks.

    sdag = td.nas.make_mutable(dag, (nn.ReLU,), {"relu": nn.ReLU(), "gelu": nn.GELU()})
    sdag = td.nas.make_mutable(sdag, nn.Conv2d, td.nas.kernel_sizes(3, 5, 7))   # k x k convs
    sdag = td.nas.make_mutable(sdag, td.nas.residual, td.nas.skippable())      # depth
    for m in td.nas.mutables(sdag): m.current_choice = m.sample_choice()
    sub = td.nas.export_subnet(sdag, td.nas.dump_chosen(sdag))                 # plain DagModule
"""

from . import serde as serde  # registers the Mutable ops
from .candidates import kernel_sizes, skippable
from .channels import DerivedWidth
from .make import make_mutable, residual
from .mutable import ChannelMutable, Mutable, VertexMutable
from .predictor import RidgePredictor
from .search import Candidate, ParetoFront, accuracy_score, loss_score, search
from .space import (
    channel_grid,
    decode,
    derived,
    dump_chosen,
    export_subnet,
    largest,
    mutables,
    sample,
    search_dim,
    set_chosen,
    smallest,
)
from .supernet import train_supernet
from .vertex import MutableOp, is_mutable

__all__ = [
    "Candidate",
    "ChannelMutable",
    "DerivedWidth",
    "Mutable",
    "MutableOp",
    "ParetoFront",
    "RidgePredictor",
    "VertexMutable",
    "accuracy_score",
    "channel_grid",
    "decode",
    "derived",
    "dump_chosen",
    "export_subnet",
    "is_mutable",
    "kernel_sizes",
    "largest",
    "loss_score",
    "make_mutable",
    "mutables",
    "residual",
    "sample",
    "search",
    "search_dim",
    "set_chosen",
    "skippable",
    "smallest",
    "train_supernet",
]
