// Parse the node's SEG and SR files with the libraries OHIF and Cornerstone3D use (dcmjs and
// @cornerstonejs/adapters, the versions OHIF 3.13.2 bundles) and print one JSON summary.
//
//   node parse_results.mjs --sources ct1.dcm ct2.dcm ... --results seg.dcm sr.dcm ...
//
// SEG: adaptersSEG.Cornerstone.Segmentation.generateToolState (the labelmap reader of
// cornerstoneTools 4 / OHIF) against a metadata provider built from the source images; the
// output gives, per segment number, the voxel count and the slices (source image index).
// SR: dcmjs naturalizes it; its TID 1500 groups are merged per Tracking Unique Identifier the
// way OHIF's SR extension merges them, and for each finding the script reports its first
// graphic (value type, graphic type, referenced image) and its NUM labels; then
// adaptersSR.Cornerstone3D.MeasurementReport.generateToolState runs over it (it must not throw).
import fs from 'node:fs';
import dcmjs from 'dcmjs';
import { adaptersSEG, adaptersSR } from '@cornerstonejs/adapters';

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

function read(path) {
  const bytes = fs.readFileSync(path);
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const dicom = DicomMessage.readFile(buffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(dicom.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(dicom.meta);
  return { buffer, dataset };
}

const asArray = x => (x === undefined ? [] : Array.isArray(x) ? x : [x]);
const code = item => asArray(item.ConceptNameCodeSequence)[0] || {};

const args = process.argv.slice(2);
const sources = [];
const results = [];
let target = null;
for (const a of args) {
  if (a === '--sources') target = sources;
  else if (a === '--results') target = results;
  else target.push(a);
}

// Metadata provider over the source images, keyed by a made-up imageId per file.
const instances = new Map();
const imageIds = sources.map((path, i) => {
  const imageId = `dicomfile:${i}`;
  instances.set(imageId, read(path).dataset);
  return imageId;
});
const metadataProvider = {
  get(type, imageId) {
    const ds = instances.get(imageId);
    if (!ds) return undefined;
    switch (type) {
      case 'instance':
        return ds;
      case 'generalSeriesModule':
        return { seriesInstanceUID: ds.SeriesInstanceUID, modality: ds.Modality };
      case 'generalImageModule':
        return { sopInstanceUID: ds.SOPInstanceUID, instanceNumber: ds.InstanceNumber };
      case 'imagePlaneModule': {
        const iop = ds.ImageOrientationPatient.map(Number);
        return {
          rows: ds.Rows,
          columns: ds.Columns,
          rowCosines: iop.slice(0, 3),
          columnCosines: iop.slice(3, 6),
          imageOrientationPatient: iop,
          imagePositionPatient: ds.ImagePositionPatient.map(Number),
          rowPixelSpacing: Number(ds.PixelSpacing[0]),
          columnPixelSpacing: Number(ds.PixelSpacing[1]),
          frameOfReferenceUID: ds.FrameOfReferenceUID,
        };
      }
      default:
        return undefined;
    }
  },
};

async function parseSeg(path, buffer) {
  const state = await adaptersSEG.Cornerstone.Segmentation.generateToolState(
    imageIds, buffer, metadataProvider, false, 1e-3, 4
  );
  const slice = sources.length ? instances.get(imageIds[0]).Rows * instances.get(imageIds[0]).Columns : 0;
  const segments = {};
  state.labelmapBufferArray.forEach(labelmap => {
    const voxels = new Uint8Array(labelmap);
    for (let k = 0; k < imageIds.length; k++) {
      for (let p = k * slice; p < (k + 1) * slice; p++) {
        const n = voxels[p];
        if (!n) continue;
        const s = (segments[n] ||= { voxels: 0, slices: new Set() });
        s.voxels += 1;
        s.slices.add(k);
      }
    }
  });
  const out = {};
  for (const [n, s] of Object.entries(segments)) out[n] = { voxels: s.voxels, slices: [...s.slices].sort((a, b) => a - b) };
  const labels = state.segMetadata.data.slice(1).map(d => d && d.SegmentLabel);
  return { kind: 'SEG', path, segments: out, labels, overlapping: Boolean(state.overlappingSegments) };
}

function parseSr(path, dataset) {
  const content = asArray(dataset.ContentSequence);
  const measurements = content.find(i => code(i).CodeValue === '126010');
  const groups = measurements ? asArray(measurements.ContentSequence).filter(i => code(i).CodeValue === '125007') : [];
  const merged = new Map();
  for (const group of groups) {
    const items = asArray(group.ContentSequence);
    const uid = items.find(i => code(i).CodeValue === '112040').UID;
    if (!merged.has(uid)) merged.set(uid, []);
    merged.get(uid).push(...items);
  }
  const findings = [];
  for (const [uid, items] of merged) {
    const graphic = items.find(i => i.ValueType === 'SCOORD' || i.ValueType === 'SCOORD3D');
    const nums = items.filter(i => i.ValueType === 'NUM' && i.MeasuredValueSequence);
    const site = items.find(i => code(i).CodeValue === '363698007');
    const ref = graphic && graphic.ValueType === 'SCOORD' ? asArray(asArray(graphic.ContentSequence)[0].ReferencedSOPSequence)[0] : null;
    findings.push({
      trackingUid: uid,
      trackingId: items.find(i => code(i).CodeValue === '112039').TextValue,
      graphic: graphic ? { valueType: graphic.ValueType, graphicType: graphic.GraphicType, points: asArray(graphic.GraphicData).length } : null,
      referencedSOPInstanceUID: ref ? ref.ReferencedSOPInstanceUID : null,
      labels: nums.map(n => ({
        name: code(n).CodeMeaning,
        value: Number(asArray(n.MeasuredValueSequence)[0].NumericValue),
        unit: asArray(asArray(n.MeasuredValueSequence)[0].MeasurementUnitsCodeSequence)[0].CodeValue,
      })),
      findingSite: site ? asArray(site.ConceptCodeSequence)[0].CodeMeaning : null,
    });
  }
  const evaluations = content.find(i => code(i).CodeValue === 'C0034375');
  // The Cornerstone3D reader OHIF uses to hydrate an SR into its tools; errors per group are
  // caught inside it (console.warn), an exception here would break OHIF's SR loading.
  const warnings = [];
  const warn = console.warn;
  const log = console.log;
  console.warn = (...a) => warnings.push(a.map(String).join(' '));
  console.log = () => {};
  let toolState;
  try {
    const sopToImageId = {};
    for (const id of imageIds) sopToImageId[instances.get(id).SOPInstanceUID] = id;
    toolState = adaptersSR.Cornerstone3D.MeasurementReport.generateToolState(dataset, sopToImageId, metadataProvider);
  } finally {
    console.warn = warn;
    console.log = log;
  }
  return {
    kind: 'SR',
    path,
    template: dataset.ContentTemplateSequence.TemplateIdentifier,
    title: code(dataset).CodeMeaning,
    findings,
    evaluations: evaluations ? asArray(evaluations.ContentSequence).map(i => i.TextValue || asArray(i.ConceptCodeSequence)[0].CodeMeaning) : [],
    toolTypes: Object.keys(toolState || {}),
    readerWarnings: warnings.length,
  };
}

const out = [];
for (const path of results) {
  const { buffer, dataset } = read(path);
  if (dataset.Modality === 'SEG') out.push(await parseSeg(path, buffer));
  else if (dataset.Modality === 'SR') out.push(parseSr(path, dataset));
  else throw new Error(`${path}: not a SEG or SR (${dataset.Modality})`);
}
process.stdout.write(JSON.stringify(out, null, 1));
