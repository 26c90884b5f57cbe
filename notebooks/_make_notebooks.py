"""Writes the three example notebooks (sources only); `make notebooks` executes them in place
(each must run in under 2 minutes on a CPU: tests/test_notebooks.py)."""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent
SETUP = """import warnings
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
import matplotlib.pyplot as plt
import torch
import fiber_plugins as fp
from fiber_plugins import zoo
from fiber_plugins.data import color_mnist as cm
from fiber_plugins.evaluation import known_calibration
from fiber_plugins.grid import fiber_grid
warnings.filterwarnings("ignore", category=FutureWarning)
torch.manual_seed(0)
# the Color-MNIST benchmark's NDTM settings (docs/color_mnist.md); seconds per call on a CPU
SETTINGS = dict(num_steps=25, inner_steps=3, lr_start=0.1, lr_end=0.002, guidance=0.3)

def show(img, title="", width=9):
    plt.figure(figsize=(width, width * img.size[1] / img.size[0]))
    plt.imshow(img); plt.axis("off"); plt.title(title); plt.show()

# off-manifold check: the prior's denoising error (realism score; real digits ~0.1, noise > 2),
# flagged above the threshold calibrated on 500 held-out digits; flagged samples get an orange frame
def show_fiber(prior, res, title):
    check = known_calibration(prior)
    scores = check.score(prior, res.images.flatten(0, 1)).view(res.images.shape[:2])
    flags = check.flag(scores)
    show(fiber_grid(res.references, res.images, res.fiber_loss, flagged=flags), title)
    print(f"realism scores (threshold {check.threshold:.2f}):", [round(float(v), 2) for v in scores.flatten()])
    print(f"{int(flags.sum())} of {flags.numel()} samples flagged off-manifold")
    return flags
"""


def nb(cells):
    book = nbf.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.cells = [nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c) for c in cells]
    return book


captum = nb([
    "md:# Captum companion: what the classifier does *not* see\n\n"
    "You have a classifier and an attribution map from Captum. The attribution says which pixels "
    "mattered; the **fiber** shows images the model cannot tell apart from the input. Here: the "
    "shipped Color-MNIST digit CNN, Integrated Gradients, and NDTM fiber samples from the shipped "
    "diffusion prior, with the per-pixel *invariance map*.",
    SETUP,
    "from captum.attr import IntegratedGradients\n"
    "from captum.attr import visualization as viz\n"
    "from fiber_plugins.attribution import OutputFiber, visualize_invariance\n\n"
    "model = zoo.load('color-mnist-classifier')\n"
    "prior = zoo.load('color-mnist-prior')\n"
    "g, y = cm.load_digits('test')\n"
    "x, _ = cm.make_colored(g[[0]], torch.Generator().manual_seed(3))   # one held-out digit in [0, 1]\n"
    "pred = model(x).argmax(1)\n"
    "print('label', int(y[0]), 'prediction', int(pred))",
    "md:## 1. The attribution you already have",
    "ig = IntegratedGradients(model).attribute(x, target=pred)\n"
    "_ = viz.visualize_image_attr(ig[0].permute(1, 2, 0).detach().numpy(), x[0].permute(1, 2, 0).numpy(),\n"
    "                             method='blended_heat_map', sign='absolute_value', show_colorbar=True,\n"
    "                             title='Integrated Gradients for the predicted class')",
    "md:## 2. The same `target`: the fiber of one logit\n\n"
    "Captum's `target=pred` selects one number, the logit of the predicted class. Its fiber is every "
    "image with that same logit value, which is a very large set.",
    "one = OutputFiber(model).attribute(x, target=pred, prior=prior, n=6, seed=0, **SETTINGS)\n"
    "flags_one = show_fiber(prior, one.result, 'fiber of the predicted logit')\n"
    "with torch.no_grad():\n"
    "    print('predictions of the samples:', model(one.result.images[0]).argmax(1).tolist())",
    "md:Every sample has the reference's 7-logit, yet they are not all sevens. Three look like a 7 "
    "to a person (the khaki one on blue, the magenta one on green, the green one with a hook); the "
    "others are loose strokes, a Z and a 3. The classifier still calls five of them 7; the 3 it "
    "calls 3: the fiber fixes the 7-logit, not the other nine, so another class can win. A sample "
    "that the prior itself finds unrealistic would get an orange frame (realism score above the "
    "threshold calibrated on real digits, printed above: real digits score about 0.1, pure noise "
    "above 2); none of these six is flagged (scores 0.09-0.29). An attribution for one target "
    "cannot show you this set.",
    "md:## 3. All logits: `target=None`\n\nThe fiber of the whole logit vector: images whose ten "
    "logits all match the reference's.",
    "full = OutputFiber(model).attribute(x, prior=prior, n=6, seed=0, **SETTINGS)\n"
    "res = full.result\n"
    "flags = show_fiber(prior, res, 'fiber of all ten logits')\n"
    "with torch.no_grad():\n"
    "    p_ref = model(x).softmax(1)[0, pred]\n"
    "    p_samples = model(res.images[0]).softmax(1)[:, pred[0]]\n"
    "print('p(predicted class): reference %.3f, samples %s' % (p_ref, [round(float(p), 3) for p in p_samples]))",
    "md:Every sample keeps p(7) within 0.05 of the reference's 0.905 (0.892-0.950), with background "
    "and stroke colours changed: the logits carry (almost) no colour information. They do not pin "
    "down the shape either: three samples are clear sevens (green on purple, magenta on green, red "
    "on teal) and one a boxy 7 or 9; the others are broken strokes and a 3-like shape. Read the "
    "fiber loss under each sample first: all six are close to the fiber (0.02-0.55), the broken "
    "strokes the furthest. The prior flags none of them (scores 0.15-0.44 against the threshold "
    "0.47).\n\n"
    "The invariance map is the per-pixel standard deviation over the six samples, drawn with "
    "Captum's heat map (colour map `Blues`): **darker = the samples differ more there**, i.e. the "
    "classifier does not constrain those pixels. It is darkest on the stroke region, where the "
    "samples put their different strokes; compare it with the attribution above.",
    "fig, ax = visualize_invariance(full, index=0)",
])

sae = nb([
    "md:# SAE feature inspection on a vit-prisma HookedViT\n\n"
    "Someone inspecting sparse-autoencoder features wants to know what a feature is *blind* to. "
    "The project ships a tiny HookedViT trained on Color-MNIST and a ReLU SAE trained on its "
    "`blocks.1.hook_resid_post` stream. We pick the features that fire most on a reference digit's "
    "CLS token and sample images with the same feature activations.",
    SETUP,
    "from fiber_plugins.adapters.sae import sae_objective, sae_features\n\n"
    "vit = zoo.load('color-mnist-vit')\n"
    "sae = zoo.load('color-mnist-vit-sae')\n"
    "prior = zoo.load('color-mnist-prior')\n"
    "hook = zoo.training_info('color-mnist-vit-sae')['hook']\n"
    "g, y = cm.load_digits('test')\n"
    "x, _ = cm.make_colored(g[[1]], torch.Generator().manual_seed(5))\n"
    "with torch.no_grad():\n"
    "    _, cache = vit.run_with_cache(x, names_filter=[hook])\n"
    "    code = sae.encode(cache[hook][:, 0])[0]          # CLS token\n"
    "top = code.topk(3).indices.tolist()\n"
    "print('digit', int(y[1]), '| active features:', int((code > 0).sum()), 'of', code.numel(), '| top 3:', top)",
    "plt.figure(figsize=(8, 2.5)); plt.bar(range(code.numel()), code.numpy()); plt.xlabel('SAE feature'); "
    "plt.ylabel('activation'); plt.title('SAE code of the reference (CLS token)'); plt.show()",
    "md:## One feature\n\nThe objective matches the top feature's pre-activation (ReLU features have "
    "no gradient while inactive, so the pre-activation guides better).",
    "feat = top[0]\n"
    "obj = sae_objective(vit, hook, sae, features=feat, pre_activation=True, token_reduction='cls')\n"
    "res = fp.NDTMSampler(prior, obj, **SETTINGS).sample(references=x, n=6, progress=False)\n"
    "show_fiber(prior, res, f'fiber of SAE feature {feat}')\n"
    "with torch.no_grad():\n"
    "    _, c2 = vit.run_with_cache(res.images[0], names_filter=[hook])\n"
    "    acts = sae.encode(c2[hook][:, 0])[:, feat]\n"
    "print('feature', feat, 'reference %.3f' % code[feat], 'samples', [round(float(a), 3) for a in acts])\n"
    "print('ViT predictions of the samples:', vit(res.images[0]).argmax(1).tolist())",
    "md:The feature keeps the reference's value (0.653-0.658 against 0.656) on a 2 in the "
    "reference's own colours, two sixes, a scribbled 8 or 9 and two eights; the ViT reads them as "
    "2, 8, 0, 2, 8, 6. A single feature is a weak constraint: it does not encode the 8 on its own. "
    "None of the six is flagged by the prior (scores 0.14-0.41).",
    "md:## The whole code\n\nMatching all 256 features of the CLS token constrains far more.",
    "obj_all = sae_objective(vit, hook, sae, features=None, token_reduction='cls')\n"
    "res_all = fp.NDTMSampler(prior, obj_all, **SETTINGS).sample(references=x, n=6, progress=False)\n"
    "show_fiber(prior, res_all, 'fiber of the whole SAE code')\n"
    "print('ViT predictions of the samples:', vit(res_all.images[0]).argmax(1).tolist())",
    "md:The ViT keeps its prediction 8 on four of the six samples, but only one of them (green on "
    "magenta) is a clear eight, and the pink loop on dark purple a possible one; the other two it "
    "calls 8 are a 6-like stroke and a slanted 1. The remaining two (a 5 and a 3-like stroke) it "
    "reads as 3. The whole code pins down more than one feature (the samples share the reference's "
    "slant and loops), but its fiber still holds other digits. The prior flags two of the six "
    "(orange: the grainy red and brown backgrounds, scores 0.84 and 0.53), so trust their shapes "
    "less.",
])

crp = nb([
    "md:# Neuron concept validation with zennit-crp\n\n"
    "A channel got a concept label. Does the label hold? We take the shipped digit CNN, find the "
    "channel of `features.8` that responds most to the digit 0 (candidate label: *'zero detector'*), "
    "look at its CRP relevance map, then sample images that activate it to the same level as the "
    "reference. If the label held, the fiber samples would all be zeros.",
    SETUP,
    "from crp.attribution import CondAttribution\n"
    "from zennit.composites import EpsilonPlusFlat\n"
    "from fiber_plugins.adapters.crp import crp_objective\n\n"
    "model = zoo.load('color-mnist-classifier')\n"
    "prior = zoo.load('color-mnist-prior')\n"
    "g, y = cm.load_digits('test')\n"
    "x_all, _ = cm.make_colored(g[:500], torch.Generator().manual_seed(0))\n"
    "with torch.no_grad():\n"
    "    acts = model.features(x_all).mean((2, 3))             # (500, 128): channel means of features.8 block\n"
    "score = acts[y[:500] == 0].mean(0) - acts[y[:500] != 0].mean(0)\n"
    "channel = int(score.argmax())\n"
    "print('candidate zero-detector channel:', channel)",
    "ref_idx = int((y == 0).nonzero()[0])\n"
    "x = cm.make_colored(g[[ref_idx]], torch.Generator().manual_seed(1))[0]\n"
    "attribution = CondAttribution(model, no_param_grad=False)\n"
    "heat = attribution(x.clone().requires_grad_(True), [{'features.10': [channel], 'y': [0]}],\n"
    "                   EpsilonPlusFlat()).heatmap\n"
    "fig, axes = plt.subplots(1, 2, figsize=(6, 3))\n"
    "axes[0].imshow(x[0].permute(1, 2, 0)); axes[0].set_title('reference'); axes[0].axis('off')\n"
    "axes[1].imshow(heat[0], cmap='bwr', vmin=-heat.abs().max(), vmax=heat.abs().max())\n"
    "axes[1].set_title(f'CRP relevance of channel {channel}'); axes[1].axis('off'); plt.show()",
    "md:## Sampling the channel's fiber\n\nThe CRP condition `{\"features.10\": [channel]}` becomes a fiber "
    "objective (channel activation, spatial mean). The composite is not active here: activation "
    "targets must not run inside a zennit composite, and the adapter refuses to.",
    "obj = crp_objective(model, {'features.10': [channel]})\n"
    "res = fp.NDTMSampler(prior, obj, **SETTINGS).sample(references=x, n=8, progress=False)\n"
    "flags = show_fiber(prior, res, f'fiber of channel {channel}')\n"
    "with torch.no_grad():\n"
    "    preds = model(res.images[0]).argmax(1)\n"
    "    a_ref = model.features(x).mean((2, 3))[0, channel]\n"
    "    a_smp = model.features(res.images[0]).mean((2, 3))[:, channel]\n"
    "print('channel activation: reference %.3f, samples %s' % (a_ref, [round(float(a), 3) for a in a_smp]))\n"
    "print('classifier predictions of the samples:', preds.tolist())\n"
    "print('fraction still classified as 0: %.2f' % float((preds == 0).float().mean()))",
    "plt.figure(figsize=(6, 2.5))\n"
    "plt.bar(range(len(a_smp)), a_smp.numpy(), label='fiber samples')\n"
    "plt.axhline(float(a_ref), color='r', ls='--', label='reference')\n"
    "plt.xlabel('sample'); plt.ylabel(f'channel {channel} activation'); plt.legend(); plt.show()",
    "md:Read the result against the label. Six of the eight samples reach the reference's "
    "activation (1.346-1.361 against 1.356; the first two stop at 1.17 and 1.24, see their fiber "
    "loss), yet none of those six is a clear zero to a person: they are a 6, a 1, a closed loop "
    "that may be an 8, two sevens and a 5. The classifier calls three of the eight 0. No sample is "
    "flagged by the prior (scores 0.10-0.25), so these are not artefacts: a 1, two sevens and a 5 "
    "drive the channel as strongly as the reference zero. So the channel responds to something "
    "broader than 'zero', and the label does not hold as stated. The evidence is images at the "
    "same activation level, not only the reference's heatmap.",
])

for name, book in [("captum_companion", captum), ("sae_feature_inspection", sae), ("neuron_concept_validation", crp)]:
    nbf.write(book, HERE / f"{name}.ipynb")
    print("wrote", HERE / f"{name}.ipynb")
