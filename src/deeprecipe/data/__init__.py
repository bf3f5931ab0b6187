"""Data set registry: a plain dict from name to the data set's config dataclass (which has `build()`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from deeprecipe.core import lookup
from deeprecipe.data.boxfiles import BoxFilesData
from deeprecipe.data.core import Data, DataError, DataSpec, StreamSplit, TensorSplit
from deeprecipe.data.detect import ScenesDetectData
from deeprecipe.data.drive import DriveData
from deeprecipe.data.images import CSVData, DigitsData, FashionMNISTData, ImageFolderData, MNISTData
from deeprecipe.data.img2img import Img2ImgData
from deeprecipe.data.pairs import PairsData
from deeprecipe.data.scenes import CityscapesData, MaskFolderData, ScenesData
from deeprecipe.data.text import TextData
from deeprecipe.data.textclass import TextClassData
from deeprecipe.data.video import MovingDigitsData, VideoFolderData
from deeprecipe.util import call_with, load_object

DATASETS: dict[str, type] = {
    "digits": DigitsData,
    "fashion-mnist": FashionMNISTData,
    "mnist": MNISTData,
    "imagefolder": ImageFolderData,
    "csv": CSVData,
    "text": TextData,
    "pairs": PairsData,
    "scenes": ScenesData,
    "cityscapes": CityscapesData,
    "maskfolder": MaskFolderData,
    "moving-digits": MovingDigitsData,
    "videofolder": VideoFolderData,
    "textclass": TextClassData,
    "scenes-detect": ScenesDetectData,
    "boxfiles": BoxFilesData,
    "img2img": Img2ImgData,
    "driving": DriveData,
}


@dataclass
class UserData:
    """`data.name: path/to/file.py:Name`: Name(**args) returns a Data, or a config object with build()."""

    name: str = ""
    args: dict = field(default_factory=dict)

    def build(self) -> Data:
        obj = call_with(load_object(self.name), self.args, {})
        data = obj.build() if hasattr(obj, "build") else obj
        if not isinstance(data, Data):
            raise DataError(f"{self.name} must return a deeprecipe.data.Data, got {type(data).__name__}")
        return data


def data_config_class(name: str) -> type:
    return lookup(DATASETS, name, "data set", "data.name", UserData)


__all__ = ["DATASETS", "Data", "DataError", "DataSpec", "StreamSplit", "TensorSplit", "data_config_class"]
