"""A folder or prefix (`s3://bucket/photos/`, `./pictures`): every image and `.tar` shard below it, breadth first,
each listing's files sorted, `LIST_THREADS` listings in flight. Listed on the driver."""

from __future__ import annotations

from pipeline.segment.sources._listing import classify_all, traverse


class Folder:
    name = "folder"

    def claims(self, target) -> bool:
        return target.is_dir

    def list_inputs(self, target, *, skipped):
        def visit(folder, tag, files, folders):
            return classify_all(target.fs, files, target.url), [(d, None) for d in folders]

        yield from traverse(target.fs, [(target.path, None)], visit)


SOURCE = Folder()
