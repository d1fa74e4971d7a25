"""The import paths the README and earlier issues promise."""


def test_promised_import_paths():
    from jaxret.index import ShardedIndex
    from jaxret.index.sharded import ShardedIndex as FromModule
    from jaxret.teachers import T5Teacher, TeacherSpec
    from jaxret.teachers.t5_teacher import T5Teacher as TeacherFromModule

    assert ShardedIndex is FromModule and T5Teacher is TeacherFromModule
    assert TeacherSpec().max_question_length == 128  # ART's target length
