"""Synthetic FLARE-like abdominal CT phantoms (``flare23 phantoms``).

Each case is a 3D body built from analytic shapes in a *canonical patient frame* (millimetres,
``x`` towards the patient's right, ``y`` anterior, ``z`` superior, i.e. RAS+; origin on the
midline at the centre of the L1 vertebral body): skin, subcutaneous fat, muscle wall, visceral
fat, lungs above a two-domed diaphragm, heart, spine (vertebral bodies, discs, canal, posterior
arch, processes, sacrum), ribs with costal cartilage, sternum, pelvis and femurs, psoas and
paraspinal muscles, small bowel, colon, bladder, the CT table, and the 13 FLARE organs
(liver right-upper, spleen left-upper, kidneys posterior with the adrenals on top, aorta
left-anterior of the spine with the IVC to its right, pancreas across the midline with its head
in the duodenal C-loop, stomach with gas and fluid, gallbladder under the liver, esophagus
entering the stomach).

Between cases the anatomy changes by a global body scale, fat and muscle thickness, per-organ
random poses (shift, scale, small rotation), a smooth random deformation and a smooth random
boundary perturbation. Hounsfield values follow a portal-venous or arterial contrast phase,
with low-frequency tissue texture, correlated noise and partial-volume blur (a Gaussian of
about half a voxel). Tumors (label 14, per host and contrast phase (metastasis, HCC, RCC, PDAC, gastric; docs/phantoms.md), 5-60 mm) are placed inside the
liver, a kidney, the pancreas or the stomach, always one voxel (26-neighbourhood) away from the
host's boundary.

What FLARE varies, the generator varies: scan range (upper abdomen, abdomen, abdomen-pelvis,
chest-abdomen-pelvis), in-plane spacing (0.6-1.0 mm at full size), slice spacing (0.8-5 mm),
orientation (RAS, LPS, LAS) and array size. It also writes what FLARE gives for training: full
labels, partial labels (:data:`PARTIAL_PROPORTIONS`) and pseudo labels with realistic errors
(:data:`PSEUDO_ERROR_PROBS`, :data:`PSEUDO_MISSED_FRACTION`).

Speed: organ shapes are evaluated only inside their bounding boxes, slab by slab along z, and the
deformation is built from 2D fields (``d_x(y, z)``, ``d_y(x, z)``, ``d_z(x, y)``) so that no 3D
displacement field is stored (the body wall, lungs and bones use the undeformed frame, which is
separable). A 512 x 512 x 300 case takes about 15 s on one loaded CPU core, a tiny case about
0.1 s. The image pass works on z-slabs with a halo; noise is drawn per
slice from a seed of its own, so the result does not depend on the slab size. Output files are
byte-identical for a seed (nibabel writes gzip with mtime 0 and no file name), whatever the
number of worker processes.

Entry points: :func:`make_phantom` (one case in memory), :func:`generate_phantoms` (a data set
in the FLARE / nnU-Net layout with a MONAI datalist) and :func:`phantoms_cli` (the
``flare23 phantoms`` command).
"""
