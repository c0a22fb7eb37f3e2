"""SimGCD continued stage by stage: the continual-GCD baseline that Happy is measured against.

Wen, Zhao and Qi, "Parametric Classification for Generalized Category Discovery: A Baseline
Study", ICCV 2023, run as the SimGCD baseline of Ma, Zhu, Zhong, Liu, Zhang and Liu, "Happy: A
Debiased Learning Framework for Continual Generalized Category Discovery", NeurIPS 2024.

On a ``continual`` split, stage 0 trains SimGCD on the labelled known classes; each later stage
s trains the same model, with the same loss, on stage s's unlabelled pool alone (new classes and
recurring old ones). With no labelled sample in the batch the supervised terms vanish and the
loss of ``SimGCD`` reduces to

    L = (1 - lambda) (L_distill - eps H(mean_i p_i) + L_u)

over the first K_s outputs of the cosine head, K_s = the number of classes seen through stage s
(``SimGCD.active_logits``): the head grows with the seen classes, the prototypes of a stage's new
classes starting where construction drew them. Nothing protects the old classes from forgetting.

What this class adds to ``SimGCD`` is the stage schedule of Happy's official scripts: a constant
teacher temperature at the unlabelled stages (``stage_teacher_temperature``; 0 keeps SimGCD's
warm-up at every stage). The stage learning rate (``lr_incremental``) and stage 0's longer run
(``first_task_epochs``) are the runner's settings. Happy (``happy.py``) extends this class, so the
two share stage 0 and every setting that is not one of Happy's parts.
"""
from __future__ import annotations

from classlab.methods.discovery.simgcd import SimGCD
from classlab.methods.registry import register_method


@register_method("discovery", "simgcd_continual")
class SimGCDContinual(SimGCD):
    def tau_t(self) -> float:
        stage_temperature = float(self.hparams.get("stage_teacher_temperature", 0.0))
        if self.task_info.task_id > 0 and stage_temperature > 0:
            return stage_temperature
        return super().tau_t()
