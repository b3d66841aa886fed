"""The main job: train and evaluate a SeTformer model on the embedded shapes
dataset on this machine, then draw what it learned.

    python tools/demo.py det      # Mask R-CNN + CocoMetric (bbox/segm AP)
    python tools/demo.py seg      # UperNet + IoUMetric (mIoU)
    python tools/demo.py det --quick   # a few iterations, for smoke tests

Steps (each a real tool of this repo, run as a user would):
1. tools/make_shapes_dataset.py writes the dataset (seconds, deterministic);
2. tools/train.py trains the demo config with mmengine's Runner;
3. tools/test.py evaluates on the validation split and draws predictions;
4. tools/plot_loss.py and tools/visualize_plan.py draw the loss curve and
   the SeT transport plan of a layer over a validation image.
Everything lands in one folder (default ``demo_out/<task>``), named at the
end with a results table.
"""
import argparse
import glob
import hashlib
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

TASKS = {
    'det': dict(
        config='configs/mask_rcnn_setformer_nano_shapes_demo.py',
        metrics=[('coco/bbox_mAP', 'bbox AP'),
                 ('coco/bbox_mAP_50', 'bbox AP50'),
                 ('coco/segm_mAP', 'segm AP'),
                 ('coco/segm_mAP_50', 'segm AP50')],
        quick=['train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
               'default_hooks.checkpoint.interval=1',
               'default_hooks.logger.interval=1']),
    'seg': dict(
        config='configs/upernet_setformer_nano_shapes_demo.py',
        metrics=[('mIoU', 'mIoU (%)'), ('mAcc', 'mAcc (%)'),
                 ('aAcc', 'aAcc (%)')],
        quick=['train_cfg.max_iters=4', 'train_cfg.val_interval=4',
               'default_hooks.checkpoint.interval=4',
               'default_hooks.logger.interval=1']),
}
DATA_ARGS = dict(num_train=200, num_val=50, size=(128, 160))
QUICK_DATA_ARGS = dict(num_train=8, num_val=4, size=(128, 160))


def step(msg: str):
    print(f'\n=== {msg}', flush=True)


def run(cmd):
    print('$ ' + ' '.join(cmd), flush=True)
    subprocess.run([sys.executable] + cmd, cwd=ROOT, check=True)


def make_data(root: str, args: dict) -> None:
    """Generate the dataset unless ``root`` holds one made by the same
    generator code with the same arguments."""
    from mmsetformer.data import shapes
    with open(shapes.__file__, 'rb') as f:
        code = hashlib.sha256(f.read()).hexdigest()[:16]
    stamp = osp.join(root, 'generator.json')
    want = json.dumps(dict(args, generator=code), sort_keys=True)
    if osp.isfile(stamp) and open(stamp).read() == want:
        print(f'dataset {root} is up to date')
        return
    run(['tools/make_shapes_dataset.py', root, '--num-train',
         str(args['num_train']), '--num-val', str(args['num_val']), '--size',
         *map(str, args['size'])])
    with open(stamp, 'w') as f:
        f.write(want)


def last_checkpoint(work_dir: str) -> str:
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def collect_predictions(show_dir: str, out_dir: str, limit: int) -> int:
    """The visualizers' drawings (mmdet writes .jpg, mmseg .png) as PNGs in
    one flat folder, the first ``limit`` of them."""
    import cv2
    os.makedirs(out_dir, exist_ok=True)
    found = sorted(
        p for p in glob.glob(osp.join(show_dir, '**', '*'), recursive=True)
        if p.lower().endswith(('.png', '.jpg')))[:limit]
    for p in found:
        name = osp.splitext(osp.basename(p))[0].replace('.jpg_0', '')
        cv2.imwrite(osp.join(out_dir, f'pred_{name}.png'), cv2.imread(p))
    return len(found)


def busiest_image(data: str) -> str:
    """The validation image with the most shapes (for the plan picture)."""
    with open(osp.join(data, 'annotations',
                       'instances_validation.json')) as f:
        coco = json.load(f)
    count = {}
    for a in coco['annotations']:
        count[a['image_id']] = count.get(a['image_id'], 0) + 1
    best = max(coco['images'],
               key=lambda im: (count.get(im['id'], 0), -im['id']))
    return osp.join(data, 'images', best['file_name'])


def results_table(metrics: dict, names) -> str:
    rows = ['| metric | value |', '| --- | --- |']
    for key, label in names:
        v = metrics.get(key)
        rows.append(f'| {label} | {v:.3f} |' if isinstance(v, (int, float))
                    else f'| {label} | n/a |')
    return '\n'.join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('task', choices=sorted(TASKS))
    p.add_argument('--out', help='output folder (default demo_out/<task>)')
    p.add_argument('--data', help='dataset root (default data/shapes, or '
                   '<out>/data with --quick)')
    p.add_argument('--quick', action='store_true',
                   help='tiny data and a few iterations (smoke test)')
    p.add_argument('--num-predictions', type=int, default=12,
                   help='prediction pictures to keep')
    p.add_argument('--cfg-options', nargs='+', default=[],
                   help='passed on to tools/train.py')
    args = p.parse_args()
    task = TASKS[args.task]
    out = osp.abspath(args.out or osp.join(ROOT, 'demo_out', args.task))
    data = osp.abspath(args.data or (osp.join(out, 'data') if args.quick
                                     else osp.join(ROOT, 'data', 'shapes')))
    work = osp.join(out, 'work_dir')
    if osp.isdir(work):
        shutil.rmtree(work)  # a fresh run, so the metrics are this run's
    os.makedirs(out, exist_ok=True)
    t0 = time.time()

    step(f'1/4 dataset -> {data}')
    make_data(data, QUICK_DATA_ARGS if args.quick else DATA_ARGS)

    step(f'2/4 train {task["config"]} on the CPU')
    options = [f'data_root={data}/',
               f'train_dataloader.dataset.data_root={data}/',
               f'val_dataloader.dataset.data_root={data}/',
               f'test_dataloader.dataset.data_root={data}/']
    if args.task == 'det':
        ann = osp.join(data, 'annotations', 'instances_validation.json')
        options += [f'val_evaluator.ann_file={ann}',
                    f'test_evaluator.ann_file={ann}']
    options += (task['quick'] if args.quick else []) + args.cfg_options
    t_train = time.time()
    run(['tools/train.py', task['config'], '--work-dir', work,
         '--cfg-options', *options])
    t_train = time.time() - t_train
    ckpt = last_checkpoint(work)

    step('3/4 evaluate on the validation split and draw predictions')
    metrics_file = osp.join(out, 'metrics.json')
    show = osp.join(work, 'show')
    run(['tools/test.py', task['config'], ckpt, '--work-dir', work,
         '--show-dir', show, '--metrics-json', metrics_file,
         '--cfg-options', *options])
    n_pred = collect_predictions(show, osp.join(out, 'predictions'),
                                 args.num_predictions)

    step('4/4 loss curve and SeT transport plan')
    run(['tools/plot_loss.py', work, '--out',
         osp.join(out, 'loss_curve.png'), '--title',
         f'{osp.basename(task["config"])}: training loss'])
    val_img = busiest_image(data)
    for stage in (0, 1):
        run(['tools/visualize_plan.py', task['config'], ckpt, val_img,
             '--stage', str(stage), '--out',
             osp.join(out, f'transport_plan_stage{stage}.png')])

    with open(metrics_file) as f:
        metrics = json.load(f)
    table = results_table(metrics, task['metrics'])
    total = time.time() - t0
    summary = (f'# {args.task} demo: {osp.basename(task["config"])}\n\n'
               f'{table}\n\ntraining {t_train / 60:.1f} min, total '
               f'{total / 60:.1f} min on {os.cpu_count()} CPU cores\n')
    with open(osp.join(out, 'results.md'), 'w') as f:
        f.write(summary)
    print('\n' + summary)
    print(f'Pictures and results in {out}:\n'
          f'  predictions/ ({n_pred} validation images with predictions)\n'
          f'  loss_curve.png, transport_plan_stage0.png, '
          f'transport_plan_stage1.png, metrics.json, results.md')


if __name__ == '__main__':
    main()
