"""The example-files storage, checked by ondemand's storage contract kit the way ondemand checks its own."""

import pytest_asyncio
from ondemand_example.files import FilesConfig, FilesStorage

from ondemand.testing import DurableStorageContract


class TestFilesStorage(DurableStorageContract):
    @pytest_asyncio.fixture
    async def storage(self, tmp_path):
        store = FilesStorage(FilesConfig(path=str(tmp_path / "store")))
        await store.open()
        yield store
        await store.close()

    @pytest_asyncio.fixture(params=["writable-by-others", "not-a-directory", "not-a-data-file"])
    async def unavailable_storage(self, request, tmp_path):
        path = tmp_path / "store"
        if request.param == "writable-by-others":  # anyone could swap its files: refused
            path.mkdir()
            path.chmod(0o777)
        elif request.param == "not-a-directory":
            path.write_text("")
        else:
            path.mkdir(mode=0o700)
            (path / "data").write_bytes(b"not ours " * 100)
        store = FilesStorage(FilesConfig(path=str(path), op_timeout=0.5))
        await store.open()
        yield store
        await store.close()
