"""Teachers that score retrieved passages: the frozen T5/T0 question-likelihood scorer."""

from jaxret.teachers.t5_teacher import T5Teacher, TeacherSpec

__all__ = ["T5Teacher", "TeacherSpec"]
