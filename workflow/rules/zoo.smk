"""Offline zoo: the generated corpus and tasks, and pre-training of zoo models."""


rule zoo_corpus:
    output:
        RESULTS + "/zoo/corpus.txt",
    params:
        seed=config["zoo"]["seed"],
        sentences=config["zoo"]["corpus_sentences"],
    log:
        RESULTS + "/logs/zoo_corpus.log",
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/zoo_corpus.py"


rule zoo_task:
    output:
        **{split: task_data("{task}", split) for split in ("train", "validation", "test")},
    params:
        seed=config["zoo"]["seed"],
        sizes=config["zoo"]["task_sizes"],
    log:
        RESULTS + "/logs/zoo_task/{task}.log",
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/zoo_task.py"


rule pretrain:
    input:
        corpus=RESULTS + "/zoo/corpus.txt",
    output:
        directory(RESULTS + "/{model}/pretrained"),
    params:
        model=lambda wc: config["models"][wc.model],
        seed=config["zoo"]["seed"],
    threads: 2
    resources:
        mem_mb=4000,
    log:
        RESULTS + "/logs/pretrain/{model}.log",
    benchmark:
        RESULTS + "/benchmarks/pretrain/{model}.tsv"
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/pretrain.py"
